// Tokenizer: golden encode/decode cases (MODELS.md §6), file validation, NFC, added-token
// options, concurrency, the embedded default tokenizer, and the tokenize/detokenize CLI.
#include "model/tokenizer.h"

#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "core/util.h"
#include "model/default_tokenizer.h"

namespace eep {
namespace {

using json = nlohmann::json;

const std::string kData = EEP_TEST_DATA;
const std::string kTokenizerPath = kData + "/tokenizer/tokenizer.json";

std::unique_ptr<Tokenizer> LoadGoldenTokenizer() {
  auto tok = Tokenizer::FromFile(kTokenizerPath);
  EXPECT_TRUE(tok.ok()) << tok.status().ToString();
  return tok.ok() ? std::move(tok).value() : nullptr;
}

json GoldenCases() {
  auto golden = ReadJsonFile(kData + "/tokenizer/tokenizer_golden.json");
  EXPECT_TRUE(golden.ok()) << golden.status().ToString();
  return golden.ok() ? (*golden)["cases"] : json::array();
}

json GoldenTokenizerJson() {
  auto j = ReadJsonFile(kTokenizerPath);
  EXPECT_TRUE(j.ok()) << j.status().ToString();
  return *j;
}

// The ByteLevel char of byte b (MODELS.md §6.4), as a vocab token string.
std::string ByteToken(int b) {
  int cp = b;
  bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
  if (!printable) {
    cp = 0x100;
    for (int x = 0; x < b; ++x) {
      bool p = (x >= 0x21 && x <= 0x7E) || (x >= 0xA1 && x <= 0xAC) || (x >= 0xAE);
      if (!p) ++cp;
    }
  }
  std::string s;
  if (cp < 0x80) {
    s.push_back(static_cast<char>(cp));
  } else {
    s.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    s.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
  return s;
}

std::vector<int64_t> Ids(const json& j) {
  return j.get<std::vector<int64_t>>();
}

TEST(Tokenizer, GoldenCases) {
  auto tok = LoadGoldenTokenizer();
  ASSERT_TRUE(tok);
  json cases = GoldenCases();
  ASSERT_GE(cases.size(), 13u);
  for (const json& c : cases) {
    const std::string text = c["text"];
    auto ids = tok->Encode(text);
    ASSERT_TRUE(ids.ok()) << ids.status().ToString();
    EXPECT_EQ(*ids, Ids(c["ids"])) << "text: " << text;
    auto decoded = tok->Decode(Ids(c["ids"]));
    ASSERT_TRUE(decoded.ok()) << decoded.status().ToString();
    EXPECT_EQ(*decoded, c["decoded"].get<std::string>()) << "text: " << text;
  }
}

TEST(Tokenizer, WorkedExample) {
  auto tok = LoadGoldenTokenizer();
  ASSERT_TRUE(tok);
  auto ids = tok->Encode("Hello, world!");
  ASSERT_TRUE(ids.ok());
  EXPECT_EQ(*ids, (std::vector<int64_t>{42, 71, 78, 337, 14, 321, 270, 78, 70, 3}));
  EXPECT_EQ(tok->IdToToken(337), "lo");
  EXPECT_EQ(tok->IdToToken(321), "\xC4\xA0w");  // "Ġw"
  EXPECT_EQ(tok->IdToToken(270), "or");
  EXPECT_EQ(tok->TokenToId("\xC4\xA0"), tok->TokenToId(ByteToken(' ')));
  EXPECT_EQ(tok->vocab_size(), 500);
  EXPECT_EQ(tok->TokenToId("<|im_start|>"), 1);
  EXPECT_EQ(tok->IdToToken(2), "<|im_end|>");
  EXPECT_EQ(tok->TokenToId("no such token"), std::nullopt);
  EXPECT_EQ(tok->IdToToken(500), std::nullopt);
  EXPECT_EQ(tok->IdToToken(-1), std::nullopt);
}

TEST(Tokenizer, ModelDirectoriesShareTheGoldenTokenizer) {
  auto golden = LoadGoldenTokenizer();
  ASSERT_TRUE(golden);
  for (const char* model : {"qwen3moe-tiny", "mixtral-tiny", "deepseekv3-tiny"}) {
    auto tok = Tokenizer::FromFile(kData + "/models/" + model + "/tokenizer.json");
    ASSERT_TRUE(tok.ok()) << tok.status().ToString();
    for (const json& c : GoldenCases()) {
      EXPECT_EQ(*(*tok)->Encode(c["text"]), Ids(c["ids"])) << model;
    }
  }
}

TEST(Tokenizer, SpecialTokensAndEmptyInput) {
  auto tok = LoadGoldenTokenizer();
  ASSERT_TRUE(tok);
  EXPECT_TRUE(tok->Encode("")->empty());
  EXPECT_EQ(*tok->Decode({}), "");
  EXPECT_EQ(*tok->Encode("<|im_start|><|im_end|><|endoftext|>"), (std::vector<int64_t>{1, 2, 0}));
  // A partial special is ordinary text.
  auto partial = tok->Encode("<|im_sta");
  ASSERT_TRUE(partial.ok());
  EXPECT_EQ(std::count(partial->begin(), partial->end(), 1), 0);
  EXPECT_EQ(*tok->Decode(*partial), "<|im_sta");
  EXPECT_EQ(*tok->Decode({1, 2, 0}), "<|im_start|><|im_end|><|endoftext|>");
}

TEST(Tokenizer, DecodeRejectsUnknownIds) {
  auto tok = LoadGoldenTokenizer();
  ASSERT_TRUE(tok);
  for (int64_t bad : {int64_t{500}, int64_t{99999}, int64_t{-1}}) {
    auto r = tok->Decode({42, bad});
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
    EXPECT_NE(r.status().message().find(std::to_string(bad)), std::string::npos)
        << r.status().message();
  }
}

TEST(Tokenizer, DecodeInvalidUtf8BecomesReplacementChar) {
  auto tok = LoadGoldenTokenizer();
  ASSERT_TRUE(tok);
  auto id = [&](int b) { return *tok->TokenToId(ByteToken(b)); };
  const std::string fffd = "\xEF\xBF\xBD";
  // A truncated 3-byte sequence is one maximal subpart: one U+FFFD.
  EXPECT_EQ(*tok->Decode({id('a'), id(0xE4), id(0xB8), id('b')}), "a" + fffd + "b");
  // C0 is never valid; 80 is a lone continuation byte: two replacements.
  EXPECT_EQ(*tok->Decode({id(0xC0), id(0x80)}), fffd + fffd);
  // Surrogate encoding ED A0 80: ED's second byte must be 80..9F, so three replacements.
  EXPECT_EQ(*tok->Decode({id(0xED), id(0xA0), id(0x80)}), fffd + fffd + fffd);
  // Bytes split across tokens reassemble: E4 B8 AD = U+4E2D.
  EXPECT_EQ(*tok->Decode({id(0xE4), id(0xB8), id(0xAD)}), "\xE4\xB8\xAD");
  // A special token flushes pending bytes.
  EXPECT_EQ(*tok->Decode({id(0xE4), 1}), fffd + "<|im_start|>");
}

TEST(Tokenizer, EncodeRejectsInvalidUtf8) {
  auto tok = LoadGoldenTokenizer();
  ASSERT_TRUE(tok);
  auto r = tok->Encode("ok\xFF");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(r.status().message().find("offset 2"), std::string::npos) << r.status().message();
}

TEST(Tokenizer, Nfc) {
  EXPECT_EQ(NfcNormalize("plain ascii"), "plain ascii");
  EXPECT_EQ(NfcNormalize("e\xCC\x81"), "\xC3\xA9");  // e + U+0301 -> é
  EXPECT_EQ(NfcNormalize("\xE1\x84\x80\xE1\x85\xA1\xE1\x86\xA8"), "\xEA\xB0\x81");  // Hangul LVT
  // A + U+0302 (ccc 230) + U+0323 (ccc 220): reorder, then compose twice -> U+1EAC.
  EXPECT_EQ(NfcNormalize("A\xCC\x82\xCC\xA3"), "\xE1\xBA\xAC");
  EXPECT_EQ(NfcNormalize("\xE2\x84\xAB"), "\xC3\x85");  // U+212B ANGSTROM (singleton) -> U+00C5
  // U+0958 is a composition exclusion: it stays decomposed.
  EXPECT_EQ(NfcNormalize("\xE0\xA5\x98"), "\xE0\xA4\x95\xE0\xA4\xBC");
  EXPECT_EQ(NfcNormalize("\xE4\xB8\xAD\xE6\x96\x87"), "\xE4\xB8\xAD\xE6\x96\x87");  // CJK unchanged
  // A leading combining mark composes with nothing.
  EXPECT_EQ(NfcNormalize("\xCC\x81"
                         "e"),
            "\xCC\x81"
            "e");

  auto tok = LoadGoldenTokenizer();
  ASSERT_TRUE(tok);
  EXPECT_EQ(*tok->Encode("cafe\xCC\x81"), *tok->Encode("caf\xC3\xA9"));
}

TEST(Tokenizer, ConcurrentEncode) {
  auto tok = LoadGoldenTokenizer();
  ASSERT_TRUE(tok);
  json cases = GoldenCases();
  std::vector<std::thread> threads;
  std::vector<int> failures(8, 0);
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      for (int rep = 0; rep < 50; ++rep) {
        for (const json& c : cases) {
          auto ids = tok->Encode(c["text"].get<std::string>());
          if (!ids.ok() || *ids != Ids(c["ids"])) ++failures[t];
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  for (int t = 0; t < 8; ++t) EXPECT_EQ(failures[t], 0) << "thread " << t;
}

// ---- variants of the golden file ----

std::string Encoded(const Tokenizer& tok, const std::string& text) {
  auto ids = tok.Encode(text);
  EXPECT_TRUE(ids.ok()) << ids.status().ToString();
  std::string s;
  for (int64_t id : *ids) s += std::to_string(id) + ",";
  return s;
}

TEST(Tokenizer, MergesAsStrings) {
  json j = GoldenTokenizerJson();
  json merges = json::array();
  for (const json& m : j["model"]["merges"]) {
    merges.push_back(m[0].get<std::string>() + " " + m[1].get<std::string>());
  }
  j["model"]["merges"] = merges;
  auto tok = Tokenizer::FromJson(j.dump(), "string-merges");
  ASSERT_TRUE(tok.ok()) << tok.status().ToString();
  for (const json& c : GoldenCases()) EXPECT_EQ(*(*tok)->Encode(c["text"]), Ids(c["ids"]));
}

TEST(Tokenizer, ByteLevelPreTokenizerWithGpt2Regex) {
  json j = GoldenTokenizerJson();
  j["normalizer"] = nullptr;
  j["pre_tokenizer"] = {{"type", "ByteLevel"},
                        {"add_prefix_space", false},
                        {"trim_offsets", true},
                        {"use_regex", true}};
  auto tok = Tokenizer::FromJson(j.dump(), "gpt2-style");
  ASSERT_TRUE(tok.ok()) << tok.status().ToString();
  auto golden = LoadGoldenTokenizer();
  // These split identically under both regexes.
  for (const char* text : {"Hello, world!", "The quick brown fox jumps over the lazy dog."}) {
    EXPECT_EQ(Encoded(**tok, text), Encoded(*golden, text)) << text;
  }
  // GPT-2 keeps digits together: "42" is one pre-token, so it can merge differently but must
  // still decode back.
  auto ids = (*tok)->Encode("numbers 1234567890");
  ASSERT_TRUE(ids.ok());
  EXPECT_EQ(*(*tok)->Decode(*ids), "numbers 1234567890");

  j["pre_tokenizer"]["add_prefix_space"] = true;
  auto prefixed = Tokenizer::FromJson(j.dump(), "gpt2-prefix");
  ASSERT_TRUE(prefixed.ok()) << prefixed.status().ToString();
  EXPECT_EQ(Encoded(**prefixed, "world"), Encoded(*golden, " world"));
}

TEST(Tokenizer, AddedTokenOptions) {
  json j = GoldenTokenizerJson();
  auto add = [&](int id, const std::string& content, bool lstrip, bool rstrip, bool single_word,
                 bool normalized) {
    j["added_tokens"].push_back({{"id", id},
                                 {"content", content},
                                 {"single_word", single_word},
                                 {"lstrip", lstrip},
                                 {"rstrip", rstrip},
                                 {"normalized", normalized},
                                 {"special", !normalized}});
  };
  add(500, "<L>", true, false, false, false);
  add(501, "<R>", false, true, false, false);
  add(502, "ab", false, false, true, false);
  add(503, "caf\xC3\xA9", false, false, false, true);  // matched after NFC
  auto r = Tokenizer::FromJson(j.dump(), "added");
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  const Tokenizer& tok = **r;
  auto golden = LoadGoldenTokenizer();
  EXPECT_EQ(tok.vocab_size(), 504);
  EXPECT_EQ(Encoded(tok, "x  <L>y"), Encoded(*golden, "x") + "500," + Encoded(*golden, "y"));
  EXPECT_EQ(Encoded(tok, "x<R>  y"), Encoded(*golden, "x") + "501," + Encoded(*golden, "y"));
  EXPECT_EQ(Encoded(tok, "xab"), Encoded(*golden, "xab"));  // not a single word
  EXPECT_EQ(Encoded(tok, "x ab."), Encoded(*golden, "x ") + "502," + Encoded(*golden, "."));
  EXPECT_EQ(Encoded(tok, "cafe\xCC\x81!"), "503," + Encoded(*golden, "!"));
  EXPECT_EQ(*tok.Decode({500, 42, 501}), "<L>H<R>");
  EXPECT_EQ(tok.TokenToId("<R>"), 501);
}

// ---- validation ----

Status LoadError(const json& j, const std::string& source = "bad.json") {
  auto r = Tokenizer::FromJson(j.dump(), source);
  return r.ok() ? Status::Ok() : r.status();
}

void ExpectError(const Status& s, std::initializer_list<std::string> needles) {
  ASSERT_FALSE(s.ok());
  for (const std::string& n : needles) {
    EXPECT_NE(s.message().find(n), std::string::npos)
        << "missing '" << n << "' in: " << s.message();
  }
}

TEST(TokenizerValidation, MalformedFiles) {
  json base = GoldenTokenizerJson();
  {
    json j = base;
    j["model"].erase("merges");
    ExpectError(LoadError(j), {"bad.json", "model.merges", "missing"});
  }
  {
    json j = base;
    j["model"].erase("vocab");
    ExpectError(LoadError(j), {"bad.json", "model.vocab", "missing"});
  }
  {
    json j = base;
    j["model"]["type"] = "WordPiece";
    ExpectError(LoadError(j), {"bad.json", "model.type", "WordPiece"});
  }
  {
    json j = base;
    j["model"]["merges"].push_back({"zz_unknown", "a"});
    ExpectError(LoadError(j), {"bad.json", "model.merges[241]", "zz_unknown"});
  }
  {
    json j = base;
    j["normalizer"] = {{"type", "NFKC"}};
    ExpectError(LoadError(j), {"bad.json", "normalizer", "NFKC"});
  }
  {
    json j = base;
    j["normalizer"] = {{"type", "Sequence"},
                       {"normalizers", {{{"type", "NFC"}}, {{"type", "Lowercase"}}}}};
    ExpectError(LoadError(j), {"normalizer.normalizers[1]", "Lowercase"});
    j["normalizer"]["normalizers"].erase(1);
    EXPECT_TRUE(LoadError(j).ok());
  }
  {
    json j = base;
    j["pre_tokenizer"]["pretokenizers"][0] = {{"type", "Whitespace"}};
    ExpectError(LoadError(j), {"bad.json", "pre_tokenizer.pretokenizers[0]", "Whitespace"});
  }
  {
    json j = base;
    j["pre_tokenizer"]["pretokenizers"][0]["behavior"] = "Removed";
    ExpectError(LoadError(j), {"behavior", "Removed"});
  }
  {
    json j = base;
    j["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "(unclosed";
    ExpectError(LoadError(j), {"bad.json", "pattern.Regex", "compile"});
  }
  {
    json j = base;
    j["decoder"] = {{"type", "WordPiece"}};
    ExpectError(LoadError(j), {"bad.json", "decoder", "WordPiece"});
  }
  {
    json j = base;
    j["model"]["dropout"] = 0.1;
    ExpectError(LoadError(j), {"model.dropout"});
  }
  {
    json j = base;
    j["added_tokens"][0].erase("content");
    ExpectError(LoadError(j), {"added_tokens[0].content"});
  }
  {
    auto r = Tokenizer::FromJson("{\"model\": ", "truncated.json");
    ASSERT_FALSE(r.ok());
    ExpectError(r.status(), {"truncated.json", "invalid JSON"});
  }
}

TEST(TokenizerValidation, FileErrorsNameTheFile) {
  namespace fs = std::filesystem;
  fs::path dir = fs::temp_directory_path() / ("eep_tok_test_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  std::string bad_json = (dir / "bad_json.json").string();
  ASSERT_TRUE(WriteFile(bad_json, "{ not json").ok());
  auto r = Tokenizer::FromFile(bad_json);
  ASSERT_FALSE(r.ok());
  ExpectError(r.status(), {bad_json});

  json j = GoldenTokenizerJson();
  j["model"].erase("merges");
  std::string no_merges = (dir / "no_merges.json").string();
  ASSERT_TRUE(WriteFile(no_merges, j.dump()).ok());
  r = Tokenizer::FromFile(no_merges);
  ExpectError(r.status(), {no_merges, "model.merges"});

  std::string missing = (dir / "missing.json").string();
  r = Tokenizer::FromFile(missing);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kNotFound);
  ExpectError(r.status(), {missing});
  fs::remove_all(dir);
}

// ---- embedded default ----

TEST(DefaultTokenizer, EqualsGoldenFileByteForByte) {
  auto file = ReadFile(kTokenizerPath);
  ASSERT_TRUE(file.ok());
  EXPECT_EQ(DefaultTokenizerJson().size(), file->size());
  EXPECT_TRUE(DefaultTokenizerJson() == *file);
  auto tok = Tokenizer::FromJson(DefaultTokenizerJson(), "<embedded>");
  ASSERT_TRUE(tok.ok()) << tok.status().ToString();
  EXPECT_EQ(*(*tok)->Encode("Hello, world!"),
            (std::vector<int64_t>{42, 71, 78, 337, 14, 321, 270, 78, 70, 3}));
}

// ---- CLI ----

std::string ShellQuote(const std::string& s) {
  std::string out = "'";
  for (char c : s) {
    if (c == '\'') {
      out += "'\\''";
    } else {
      out += c;
    }
  }
  return out + "'";
}

// Runs a command; returns its exit code and stdout (stderr goes to the test log).
int RunCommand(const std::string& cmd, std::string* out) {
  FILE* p = popen(cmd.c_str(), "r");
  if (p == nullptr) return -1;
  out->clear();
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), p)) > 0) out->append(buf, n);
  int status = pclose(p);
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

TEST(TokenizerCli, RoundTrip) {
  const std::string bin = EEP_BIN;
  const std::string model = kData + "/models/qwen3moe-tiny";
  std::string out;
  ASSERT_EQ(RunCommand(bin + " tokenize --model " + ShellQuote(model) + " --text " +
                           ShellQuote("Hello, world!"),
                       &out),
            0);
  EXPECT_EQ(out, "{\"ids\": [42, 71, 78, 337, 14, 321, 270, 78, 70, 3]}\n");

  for (const json& c : GoldenCases()) {
    const std::string text = c["text"];
    ASSERT_EQ(
        RunCommand(bin + " tokenize --model " + ShellQuote(model) + " --text " + ShellQuote(text),
                   &out),
        0)
        << text;
    json parsed = json::parse(out);
    EXPECT_EQ(Ids(parsed["ids"]), Ids(c["ids"])) << text;

    std::string ids;
    for (const json& id : c["ids"])
      ids += (ids.empty() ? "" : ",") + std::to_string(id.get<int64_t>());
    ASSERT_EQ(
        RunCommand(bin + " detokenize --model " + ShellQuote(model) + " --ids " + ShellQuote(ids),
                   &out),
        0)
        << text;
    ASSERT_EQ(std::count(out.begin(), out.end(), '\n'), 1) << out;
    EXPECT_EQ(json::parse(out)["text"].get<std::string>(), c["decoded"].get<std::string>());
  }
}

TEST(TokenizerCli, Errors) {
  const std::string bin = EEP_BIN;
  ASSERT_TRUE(std::filesystem::exists(bin)) << bin;  // else "not found" would pass as an error
  const std::string model = kData + "/models/qwen3moe-tiny";
  std::string out;
  EXPECT_NE(RunCommand(bin + " detokenize --model " + ShellQuote(model) + " --ids 1,99999", &out),
            0);
  EXPECT_EQ(out, "");
  EXPECT_NE(RunCommand(bin + " detokenize --model " + ShellQuote(model) + " --ids 1,x", &out), 0);
  EXPECT_EQ(out, "");
  EXPECT_NE(RunCommand(bin + " tokenize --model /nonexistent/model --text hi", &out), 0);
  EXPECT_EQ(out, "");
}

}  // namespace
}  // namespace eep
