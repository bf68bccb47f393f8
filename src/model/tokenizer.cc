#include "model/tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <functional>
#include <mutex>
#include <nlohmann/json.hpp>
#include <queue>
#include <string_view>
#include <unordered_map>
#include <utility>

#include "core/logging.h"
#include "core/util.h"

namespace eep {
namespace {

using json = nlohmann::json;

// ---------------------------------------------------------------------------------------------
// UTF-8

constexpr char32_t kReplacementChar = 0xFFFD;

void AppendUtf8(char32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

// Length of the well-formed sequence at p (Unicode Table 3-7), or 0 if ill-formed; then
// *prefix is the length of its maximal well-formed prefix (>= 1), which is what one U+FFFD
// replaces (the "maximal subpart" practice that Rust's from_utf8_lossy and Python follow).
size_t Utf8SequenceLength(const unsigned char* p, size_t n, size_t* prefix) {
  unsigned char b0 = p[0];
  *prefix = 1;
  if (b0 < 0x80) return 1;
  size_t len;
  unsigned char lo = 0x80, hi = 0xBF;  // allowed range of the second byte
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    len = 2;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    len = 3;
    if (b0 == 0xE0) lo = 0xA0;
    if (b0 == 0xED) hi = 0x9F;
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    len = 4;
    if (b0 == 0xF0) lo = 0x90;
    if (b0 == 0xF4) hi = 0x8F;
  } else {
    return 0;
  }
  for (size_t i = 1; i < len; ++i) {
    if (i >= n) return 0;
    unsigned char b = p[i];
    bool ok = i == 1 ? (b >= lo && b <= hi) : (b >= 0x80 && b <= 0xBF);
    if (!ok) return 0;
    *prefix = i + 1;
  }
  return len;
}

// Offset of the first ill-formed byte, or npos.
size_t FindInvalidUtf8(std::string_view s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  size_t i = 0, prefix;
  while (i < s.size()) {
    if (p[i] < 0x80) {
      ++i;
      continue;
    }
    size_t len = Utf8SequenceLength(p + i, s.size() - i, &prefix);
    if (len == 0) return i;
    i += len;
  }
  return std::string_view::npos;
}

void AppendUtf8Lossy(std::string_view bytes, std::string* out) {
  const auto* p = reinterpret_cast<const unsigned char*>(bytes.data());
  size_t i = 0, prefix;
  while (i < bytes.size()) {
    size_t len = Utf8SequenceLength(p + i, bytes.size() - i, &prefix);
    if (len == 0) {
      AppendUtf8(kReplacementChar, out);
      i += prefix;
    } else {
      out->append(bytes.data() + i, len);
      i += len;
    }
  }
}

// Decodes valid UTF-8 (checked by the caller) at *i and advances past it.
char32_t NextCodePoint(std::string_view s, size_t* i) {
  auto b = static_cast<unsigned char>(s[*i]);
  if (b < 0x80) {
    ++*i;
    return b;
  }
  int len = b >= 0xF0 ? 4 : b >= 0xE0 ? 3 : 2;
  char32_t cp = b & (0x7F >> len);
  for (int k = 1; k < len; ++k) cp = (cp << 6) | (static_cast<unsigned char>(s[*i + k]) & 0x3F);
  *i += len;
  return cp;
}

size_t Utf8CharLength(unsigned char b) {
  return b < 0x80 ? 1 : b >= 0xF0 ? 4 : b >= 0xE0 ? 3 : 2;
}

bool IsAscii(std::string_view s) {
  for (char c : s) {
    if (static_cast<unsigned char>(c) >= 0x80) return false;
  }
  return true;
}

// ---------------------------------------------------------------------------------------------
// NFC (UAX #15) from the generated tables.

struct CccRange {
  char32_t first, last;
  uint8_t ccc;
};
struct Decomposition {
  char32_t cp, first, second;  // second == 0: singleton
};
struct Composition {
  char32_t first, second, composite;
};
struct QuickCheckRange {
  char32_t first, last;
  uint8_t value;  // 1 = Maybe, 2 = No
};

#include "model/unicode_nfc_table.inc"

constexpr char32_t kSBase = 0xAC00, kLBase = 0x1100, kVBase = 0x1161, kTBase = 0x11A7;
constexpr char32_t kLCount = 19, kVCount = 21, kTCount = 28;
constexpr char32_t kNCount = kVCount * kTCount, kSCount = kLCount * kNCount;

template <typename Range, size_t N>
const Range* FindRange(const Range (&table)[N], char32_t cp) {
  const Range* end = table + N;
  const Range* it =
      std::upper_bound(table, end, cp, [](char32_t c, const Range& r) { return c < r.first; });
  if (it == table) return nullptr;
  --it;
  return cp <= it->last ? it : nullptr;
}

uint8_t CombiningClass(char32_t cp) {
  if (cp < kCccRanges[0].first) return 0;
  const CccRange* r = FindRange(kCccRanges, cp);
  return r ? r->ccc : 0;
}

uint8_t QuickCheck(char32_t cp) {
  if (cp < kQuickCheckRanges[0].first) return 0;
  const QuickCheckRange* r = FindRange(kQuickCheckRanges, cp);
  return r ? r->value : 0;
}

void DecomposeInto(char32_t cp, std::u32string* out) {
  if (cp >= kSBase && cp < kSBase + kSCount) {
    char32_t s = cp - kSBase;
    out->push_back(kLBase + s / kNCount);
    out->push_back(kVBase + (s % kNCount) / kTCount);
    if (s % kTCount != 0) out->push_back(kTBase + s % kTCount);
    return;
  }
  const auto* end = std::end(kDecompositions);
  const auto* it = std::lower_bound(std::begin(kDecompositions), end, cp,
                                    [](const Decomposition& d, char32_t c) { return d.cp < c; });
  if (it == end || it->cp != cp) {
    out->push_back(cp);
    return;
  }
  DecomposeInto(it->first, out);
  if (it->second != 0) DecomposeInto(it->second, out);
}

// The primary composite of (a, b), or 0.
char32_t ComposePair(char32_t a, char32_t b) {
  if (a >= kLBase && a < kLBase + kLCount && b >= kVBase && b < kVBase + kVCount) {
    return kSBase + ((a - kLBase) * kVCount + (b - kVBase)) * kTCount;
  }
  if (a >= kSBase && a < kSBase + kSCount && (a - kSBase) % kTCount == 0 && b > kTBase &&
      b < kTBase + kTCount) {
    return a + (b - kTBase);
  }
  const auto* end = std::end(kCompositions);
  const auto* it =
      std::lower_bound(std::begin(kCompositions), end, std::make_pair(a, b),
                       [](const Composition& c, const std::pair<char32_t, char32_t>& k) {
                         return std::make_pair(c.first, c.second) < k;
                       });
  if (it == end || it->first != a || it->second != b) return 0;
  return it->composite;
}

}  // namespace

std::string NfcNormalize(const std::string& text) {
  if (IsAscii(text)) return text;
  // Quick check: most non-ASCII text (CJK, precomposed Latin) is already NFC.
  bool maybe_changes = false;
  uint8_t last_ccc = 0;
  for (size_t i = 0; i < text.size() && !maybe_changes;) {
    char32_t cp = NextCodePoint(text, &i);
    uint8_t ccc = CombiningClass(cp);
    if ((ccc != 0 && last_ccc > ccc) || QuickCheck(cp) != 0) maybe_changes = true;
    last_ccc = ccc;
  }
  if (!maybe_changes) return text;

  std::u32string d;
  d.reserve(text.size());
  for (size_t i = 0; i < text.size();) DecomposeInto(NextCodePoint(text, &i), &d);
  // Canonical ordering: stable-sort each run of non-starters by combining class.
  for (size_t i = 0; i < d.size();) {
    if (CombiningClass(d[i]) == 0) {
      ++i;
      continue;
    }
    size_t j = i;
    while (j < d.size() && CombiningClass(d[j]) != 0) ++j;
    if (j - i > 1) {
      std::stable_sort(d.begin() + i, d.begin() + j, [](char32_t a, char32_t b) {
        return CombiningClass(a) < CombiningClass(b);
      });
    }
    i = j;
  }
  // Canonical composition. A mark composes with the last starter unless blocked by a
  // character in between of class 0 or >= its own class.
  if (!d.empty()) {
    size_t starter = 0;
    int last_class = CombiningClass(d[0]) == 0 ? 0 : 256;  // 256: no starter yet
    size_t out = 1;
    for (size_t i = 1; i < d.size(); ++i) {
      char32_t ch = d[i];
      int ch_class = CombiningClass(ch);
      if (last_class != 256 && (last_class < ch_class || last_class == 0)) {
        char32_t composite = ComposePair(d[starter], ch);
        if (composite != 0) {
          d[starter] = composite;
          continue;
        }
      }
      if (ch_class == 0) {
        starter = out;
        last_class = 0;
      } else {
        last_class = last_class == 256 ? 256 : ch_class;
      }
      d[out++] = ch;
    }
    d.resize(out);
  }
  std::string result;
  result.reserve(text.size());
  for (char32_t cp : d) AppendUtf8(cp, &result);
  return result;
}

namespace {

// ---------------------------------------------------------------------------------------------
// ByteLevel: bytes <-> printable code points (MODELS.md §6.4).

struct ByteLevelTable {
  std::array<char32_t, 256> byte_to_cp;
  std::array<std::string, 256> byte_to_utf8;
  std::unordered_map<char32_t, uint8_t> cp_to_byte;

  ByteLevelTable() {
    char32_t next = 0x100;
    for (int b = 0; b < 256; ++b) {
      bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
      byte_to_cp[b] = printable ? static_cast<char32_t>(b) : next++;
      AppendUtf8(byte_to_cp[b], &byte_to_utf8[b]);
      cp_to_byte[byte_to_cp[b]] = static_cast<uint8_t>(b);
    }
  }
};

const ByteLevelTable& ByteLevel() {
  static const ByteLevelTable table;
  return table;
}

std::string ByteLevelEncode(std::string_view s) {
  const auto& t = ByteLevel();
  std::string out;
  out.reserve(s.size() * 2);
  for (char c : s) out += t.byte_to_utf8[static_cast<unsigned char>(c)];
  return out;
}

// ---------------------------------------------------------------------------------------------
// PCRE2 regex (compiled once, matched concurrently: pcre2_code is read-only during matching).

constexpr char kGpt2Pattern[] =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

struct CodeDeleter {
  void operator()(pcre2_code* c) const { pcre2_code_free(c); }
};
struct MatchDataDeleter {
  void operator()(pcre2_match_data* m) const { pcre2_match_data_free(m); }
};
using CodePtr = std::unique_ptr<pcre2_code, CodeDeleter>;
using MatchDataPtr = std::unique_ptr<pcre2_match_data, MatchDataDeleter>;

Result<CodePtr> CompileRegex(const std::string& pattern, bool literal, const std::string& where) {
  int error = 0;
  PCRE2_SIZE offset = 0;
  uint32_t options = PCRE2_UTF | (literal ? PCRE2_LITERAL : PCRE2_UCP);
  pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                                   options, &error, &offset, nullptr);
  if (code == nullptr) {
    PCRE2_UCHAR buf[256];
    pcre2_get_error_message(error, buf, sizeof(buf));
    return Status::InvalidArgument(where + ": cannot compile regex at offset " +
                                   std::to_string(offset) + ": " +
                                   reinterpret_cast<const char*>(buf));
  }
  // JIT is an optimisation only; without it pcre2_match interprets.
  if (pcre2_jit_compile(code, PCRE2_JIT_COMPLETE) != 0) {
    EEP_LOG_DEBUG("{}: PCRE2 JIT unavailable, using the interpreter", where);
  }
  return CodePtr(code);
}

// Splits `s` Isolated-style: every match and every gap between matches is one piece; empty
// pieces are dropped. Appends views into `s` to `out`.
Status SplitIsolated(const pcre2_code* code, std::string_view s,
                     std::vector<std::string_view>* out) {
  MatchDataPtr md(pcre2_match_data_create_from_pattern(code, nullptr));
  if (!md) return Status::ResourceExhausted("pcre2_match_data_create failed");
  const auto* subject = reinterpret_cast<PCRE2_SPTR>(s.data());
  size_t pos = 0, last = 0;
  while (pos <= s.size()) {
    // The caller validated UTF-8 once for the whole text, so skip PCRE2's per-call check
    // (which would make splitting quadratic).
    int rc = pcre2_match(code, subject, s.size(), pos, PCRE2_NO_UTF_CHECK, md.get(), nullptr);
    if (rc == PCRE2_ERROR_JIT_STACKLIMIT) {
      rc = pcre2_match(code, subject, s.size(), pos, PCRE2_NO_UTF_CHECK | PCRE2_NO_JIT, md.get(),
                       nullptr);
    }
    if (rc == PCRE2_ERROR_NOMATCH) break;
    if (rc < 0) {
      PCRE2_UCHAR buf[256];
      pcre2_get_error_message(rc, buf, sizeof(buf));
      return Status::Internal(std::string("regex match failed: ") +
                              reinterpret_cast<const char*>(buf));
    }
    const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md.get());
    size_t start = ov[0], end = ov[1];
    if (end == start) {  // empty match: not a piece; step over one character
      if (start >= s.size()) break;
      pos = start + Utf8CharLength(static_cast<unsigned char>(s[start]));
      continue;
    }
    if (start > last) out->push_back(s.substr(last, start - last));
    out->push_back(s.substr(start, end - start));
    last = pos = end;
  }
  if (last < s.size()) out->push_back(s.substr(last));
  return Status::Ok();
}

// ---------------------------------------------------------------------------------------------
// Added tokens: a byte trie for leftmost-longest matching.

struct AddedToken {
  int64_t id = 0;
  std::string content;
  bool special = false;
  bool normalized = false;
  bool lstrip = false, rstrip = false, single_word = false;
};

class AddedTokenTrie {
 public:
  bool empty() const { return terminal_.size() <= 1; }

  void Insert(const std::string& key, int token_index) {
    int node = 0;
    for (char c : key) {
      uint64_t k = Key(node, c);
      auto it = edges_.find(k);
      if (it == edges_.end()) {
        int child = static_cast<int>(terminal_.size());
        terminal_.push_back(-1);
        edges_.emplace(k, child);
        node = child;
      } else {
        node = it->second;
      }
    }
    if (terminal_[node] < 0) terminal_[node] = token_index;
  }

  // Longest key starting at s[pos]: returns (token_index, length) or (-1, 0).
  std::pair<int, size_t> LongestAt(std::string_view s, size_t pos) const {
    int node = 0;
    std::pair<int, size_t> best{-1, 0};
    for (size_t i = pos; i < s.size(); ++i) {
      auto it = edges_.find(Key(node, s[i]));
      if (it == edges_.end()) break;
      node = it->second;
      if (terminal_[node] >= 0) best = {terminal_[node], i + 1 - pos};
    }
    return best;
  }

 private:
  static uint64_t Key(int node, char c) {
    return (static_cast<uint64_t>(node) << 8) | static_cast<unsigned char>(c);
  }
  std::unordered_map<uint64_t, int> edges_;
  std::vector<int> terminal_{-1};  // node 0 is the root
};

// A piece of the input: either plain text still to be tokenized, or one added token.
struct Segment {
  std::string text;
  int64_t id = -1;  // >= 0: an added token
};

bool IsWhitespaceCp(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F ||
         c == 0x3000;
}

// ---------------------------------------------------------------------------------------------
// Word cache: sharded so concurrent encoders rarely contend.

class WordCache {
 public:
  static constexpr size_t kShards = 16;
  static constexpr size_t kMaxEntriesPerShard = 4096;
  static constexpr size_t kMaxWordBytes = 256;

  bool Get(const std::string& word, std::vector<int64_t>* ids) const {
    Shard& s = shards_[std::hash<std::string>{}(word) % kShards];
    std::lock_guard<std::mutex> lock(s.mu);
    auto it = s.map.find(word);
    if (it == s.map.end()) return false;
    ids->insert(ids->end(), it->second.begin(), it->second.end());
    return true;
  }

  void Put(const std::string& word, std::vector<int64_t> ids) const {
    if (word.size() > kMaxWordBytes) return;
    Shard& s = shards_[std::hash<std::string>{}(word) % kShards];
    std::lock_guard<std::mutex> lock(s.mu);
    // Dropping the whole shard when full is crude but bounded and lock-cheap.
    if (s.map.size() >= kMaxEntriesPerShard) s.map.clear();
    s.map.emplace(word, std::move(ids));
  }

 private:
  struct Shard {
    std::mutex mu;
    std::unordered_map<std::string, std::vector<int64_t>> map;
  };
  mutable std::array<Shard, kShards> shards_;
};

// ---------------------------------------------------------------------------------------------
// JSON validation helpers. All messages read "SOURCE: FIELD: problem".

std::string JsonType(const json& j) {
  return j.type_name();
}

// Ids index dense tables; real vocabularies are < 1M, so larger ids mean a broken file.
constexpr int64_t kMaxTokenId = int64_t{1} << 24;

}  // namespace

// ---------------------------------------------------------------------------------------------

struct Tokenizer::Impl {
  std::string source;

  // Model.
  std::unordered_map<std::string, int64_t> vocab;
  std::vector<std::string> id_to_token;  // "" where no token (see has_token)
  std::vector<bool> has_token;
  std::unordered_map<uint64_t, std::pair<int32_t, int64_t>> merges;  // (a,b) -> (rank, merged)
  std::optional<int64_t> unk_id;
  bool fuse_unk = false;
  bool byte_fallback = false;
  bool ignore_merges = false;
  std::array<int64_t, 0x144> small_char_id;  // char -> id for code points < 0x144, or -1

  // Added tokens.
  std::vector<AddedToken> added;
  std::unordered_map<int64_t, size_t> added_by_id;
  std::unordered_map<std::string, size_t> added_by_content;
  AddedTokenTrie raw_trie, normalized_trie;
  CodePtr word_char_re;  // `^\w` (Unicode, as HF's Rust regex), for single_word tokens only

  // Pipeline.
  bool nfc = false;
  struct PreTokenizerStep {
    enum Kind { kSplit, kByteLevel } kind;
    CodePtr regex;  // kSplit, or kByteLevel with use_regex
    bool add_prefix_space = false;
  };
  std::vector<PreTokenizerStep> pre_tokenizer;

  int64_t vocab_size = 0;
  WordCache cache;

  Status Load(const json& root);
  Status LoadModel(const json& model);
  Status LoadAddedTokens(const json& added_tokens);
  Status LoadNormalizer(const json& normalizer, const std::string& field);
  Status LoadPreTokenizer(const json& pre, const std::string& field);
  Status LoadDecoder(const json& decoder, const std::string& field);

  Status Err(const std::string& field, const std::string& problem) const {
    return Status::InvalidArgument(source + ": " + field + ": " + problem);
  }

  std::vector<Segment> SplitOnAdded(std::string text, const AddedTokenTrie& trie) const;
  Status PreTokenize(const std::string& text, std::vector<std::string>* words) const;
  void Bpe(const std::string& word, std::vector<int64_t>* ids) const;
  void BpeUncached(const std::string& word, std::vector<int64_t>* ids) const;
  int64_t CharId(std::string_view ch) const;
};

Status Tokenizer::Impl::Load(const json& root) {
  if (!root.is_object()) return Err("<root>", "expected a JSON object, got " + JsonType(root));
  auto model = root.find("model");
  if (model == root.end()) return Err("model", "missing");
  EEP_RETURN_IF_ERROR(LoadModel(*model));
  auto added_tokens = root.find("added_tokens");
  if (added_tokens != root.end() && !added_tokens->is_null()) {
    EEP_RETURN_IF_ERROR(LoadAddedTokens(*added_tokens));
  }
  auto normalizer = root.find("normalizer");
  if (normalizer != root.end()) EEP_RETURN_IF_ERROR(LoadNormalizer(*normalizer, "normalizer"));
  auto pre = root.find("pre_tokenizer");
  if (pre != root.end()) EEP_RETURN_IF_ERROR(LoadPreTokenizer(*pre, "pre_tokenizer"));
  bool has_byte_level = std::any_of(pre_tokenizer.begin(), pre_tokenizer.end(),
                                    [](auto& s) { return s.kind == PreTokenizerStep::kByteLevel; });
  if (!has_byte_level) {
    return Err("pre_tokenizer", "no ByteLevel step; only byte-level BPE tokenizers are supported");
  }
  auto decoder = root.find("decoder");
  if (decoder == root.end()) return Err("decoder", "missing; expected ByteLevel");
  EEP_RETURN_IF_ERROR(LoadDecoder(*decoder, "decoder"));

  // Normalized added tokens are matched against normalized text, so key them normalized.
  for (size_t i = 0; i < added.size(); ++i) {
    const AddedToken& t = added[i];
    if (t.normalized) {
      normalized_trie.Insert(nfc ? NfcNormalize(t.content) : t.content, static_cast<int>(i));
    } else {
      raw_trie.Insert(t.content, static_cast<int>(i));
    }
    if (t.single_word && !word_char_re) {
      EEP_ASSIGN_OR_RETURN(word_char_re, CompileRegex(R"(^\w)", false, source + ": added_tokens"));
    }
  }

  // Without an unk token or byte fallback, HF drops characters missing from the vocab.
  if (!unk_id && !byte_fallback) {
    int missing = 0;
    for (int b = 0; b < 256; ++b) missing += vocab.count(ByteLevel().byte_to_utf8[b]) == 0;
    if (missing > 0) {
      EEP_LOG_WARN(
          "{}: {} of the 256 byte-level characters are not in model.vocab; text "
          "containing them loses those bytes",
          source, missing);
    }
  }
  return Status::Ok();
}

Status Tokenizer::Impl::LoadModel(const json& model) {
  if (!model.is_object()) return Err("model", "expected an object, got " + JsonType(model));
  std::string type = "BPE";  // HF omits "type" in some older files; BPE is its default
  if (auto it = model.find("type"); it != model.end()) {
    if (!it->is_string()) return Err("model.type", "expected a string");
    type = it->get<std::string>();
  }
  if (type != "BPE") {
    return Err("model.type", "unsupported model type '" + type + "' (only BPE is supported)");
  }
  auto unset_or_null = [&](const char* key) {
    auto it = model.find(key);
    return it == model.end() || it->is_null();
  };
  if (!unset_or_null("dropout")) {
    const json& d = model["dropout"];
    if (!d.is_number() || d.get<double>() != 0.0) {
      return Err("model.dropout", "BPE dropout is not supported (must be null)");
    }
  }
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    if (!unset_or_null(key) && !(model[key].is_string() && model[key].get<std::string>().empty())) {
      return Err(std::string("model.") + key, "not supported (must be null)");
    }
  }
  auto get_bool = [&](const char* key, bool* out) -> Status {
    auto it = model.find(key);
    if (it == model.end() || it->is_null()) return Status::Ok();
    if (!it->is_boolean()) return Err(std::string("model.") + key, "expected a boolean");
    *out = it->get<bool>();
    return Status::Ok();
  };
  EEP_RETURN_IF_ERROR(get_bool("fuse_unk", &fuse_unk));
  EEP_RETURN_IF_ERROR(get_bool("byte_fallback", &byte_fallback));
  EEP_RETURN_IF_ERROR(get_bool("ignore_merges", &ignore_merges));

  auto v = model.find("vocab");
  if (v == model.end() || v->is_null()) return Err("model.vocab", "missing");
  if (!v->is_object()) return Err("model.vocab", "expected an object, got " + JsonType(*v));
  for (auto it = v->begin(); it != v->end(); ++it) {
    if (!it.value().is_number_integer() || it.value().get<int64_t>() < 0) {
      return Err("model.vocab", "id of token '" + it.key() + "' is not a non-negative integer");
    }
    int64_t id = it.value().get<int64_t>();
    if (id >= kMaxTokenId) {
      return Err("model.vocab", "id " + std::to_string(id) + " of '" + it.key() + "' is too large");
    }
    vocab.emplace(it.key(), id);
    vocab_size = std::max(vocab_size, id + 1);
  }
  if (vocab.empty()) return Err("model.vocab", "empty");
  id_to_token.assign(vocab_size, std::string());
  has_token.assign(vocab_size, false);
  for (const auto& [tok, id] : vocab) {
    if (!has_token[id]) {
      id_to_token[id] = tok;
      has_token[id] = true;
    }
  }

  small_char_id.fill(-1);
  for (char32_t cp = 0; cp < small_char_id.size(); ++cp) {
    std::string s;
    AppendUtf8(cp, &s);
    if (auto it = vocab.find(s); it != vocab.end()) small_char_id[cp] = it->second;
  }

  if (!unset_or_null("unk_token")) {
    const json& u = model["unk_token"];
    if (!u.is_string()) return Err("model.unk_token", "expected a string or null");
    auto it = vocab.find(u.get<std::string>());
    if (it == vocab.end()) {
      return Err("model.unk_token", "'" + u.get<std::string>() + "' is not in model.vocab");
    }
    unk_id = it->second;
  }

  auto m = model.find("merges");
  if (m == model.end() || m->is_null()) return Err("model.merges", "missing");
  if (!m->is_array()) return Err("model.merges", "expected an array, got " + JsonType(*m));
  merges.reserve(m->size());
  for (size_t rank = 0; rank < m->size(); ++rank) {
    const json& e = (*m)[rank];
    std::string field = "model.merges[" + std::to_string(rank) + "]";
    std::string a, b;
    if (e.is_string()) {
      const std::string& s = e.get_ref<const std::string&>();
      size_t sp = s.find(' ');
      if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos) {
        return Err(field, "'" + s + "' is not of the form \"left right\"");
      }
      a = s.substr(0, sp);
      b = s.substr(sp + 1);
    } else if (e.is_array() && e.size() == 2 && e[0].is_string() && e[1].is_string()) {
      a = e[0].get<std::string>();
      b = e[1].get<std::string>();
    } else {
      return Err(field, "expected [\"left\", \"right\"] or \"left right\", got " + e.dump());
    }
    auto ia = vocab.find(a), ib = vocab.find(b), iab = vocab.find(a + b);
    if (ia == vocab.end()) return Err(field, "token '" + a + "' is not in model.vocab");
    if (ib == vocab.end()) return Err(field, "token '" + b + "' is not in model.vocab");
    if (iab == vocab.end()) return Err(field, "merged token '" + a + b + "' is not in model.vocab");
    uint64_t key = (static_cast<uint64_t>(ia->second) << 32) | static_cast<uint64_t>(ib->second);
    // A repeated pair keeps its first (lowest) rank.
    merges.emplace(key, std::make_pair(static_cast<int32_t>(rank), iab->second));
  }
  return Status::Ok();
}

Status Tokenizer::Impl::LoadAddedTokens(const json& list) {
  if (!list.is_array()) return Err("added_tokens", "expected an array, got " + JsonType(list));
  for (size_t i = 0; i < list.size(); ++i) {
    const json& e = list[i];
    std::string field = "added_tokens[" + std::to_string(i) + "]";
    if (!e.is_object()) return Err(field, "expected an object");
    auto id = e.find("id");
    auto content = e.find("content");
    if (id == e.end() || !id->is_number_integer() || id->get<int64_t>() < 0) {
      return Err(field + ".id", "missing or not a non-negative integer");
    }
    if (content == e.end() || !content->is_string() || content->get<std::string>().empty()) {
      return Err(field + ".content", "missing or not a non-empty string");
    }
    if (id->get<int64_t>() >= kMaxTokenId) return Err(field + ".id", "too large");
    AddedToken t;
    t.id = id->get<int64_t>();
    t.content = content->get<std::string>();
    if (FindInvalidUtf8(t.content) != std::string::npos) {
      return Err(field + ".content", "not valid UTF-8");
    }
    auto flag = [&](const char* key, bool dflt) {
      auto it = e.find(key);
      return it != e.end() && it->is_boolean() ? it->get<bool>() : dflt;
    };
    t.special = flag("special", false);
    t.normalized = flag("normalized", !t.special);
    t.lstrip = flag("lstrip", false);
    t.rstrip = flag("rstrip", false);
    t.single_word = flag("single_word", false);
    if (added_by_content.count(t.content)) continue;  // HF keeps the first
    added_by_id[t.id] = added.size();
    added_by_content[t.content] = added.size();
    vocab_size = std::max(vocab_size, t.id + 1);
    added.push_back(std::move(t));
  }
  return Status::Ok();
}

Status Tokenizer::Impl::LoadNormalizer(const json& n, const std::string& field) {
  if (n.is_null()) return Status::Ok();
  if (!n.is_object() || !n.contains("type") || !n["type"].is_string()) {
    return Err(field, "expected null or an object with a string \"type\"");
  }
  std::string type = n["type"].get<std::string>();
  if (type == "NFC") {
    nfc = true;
    return Status::Ok();
  }
  if (type == "Sequence") {
    auto list = n.find("normalizers");
    if (list == n.end() || !list->is_array()) return Err(field + ".normalizers", "missing array");
    for (size_t i = 0; i < list->size(); ++i) {
      EEP_RETURN_IF_ERROR(
          LoadNormalizer((*list)[i], field + ".normalizers[" + std::to_string(i) + "]"));
    }
    return Status::Ok();
  }
  return Err(field + ".type",
             "unsupported normalizer '" + type + "' (supported: null, NFC, Sequence of NFC)");
}

Status Tokenizer::Impl::LoadPreTokenizer(const json& p, const std::string& field) {
  if (p.is_null()) return Status::Ok();
  if (!p.is_object() || !p.contains("type") || !p["type"].is_string()) {
    return Err(field, "expected null or an object with a string \"type\"");
  }
  std::string type = p["type"].get<std::string>();
  if (type == "Sequence") {
    auto list = p.find("pretokenizers");
    if (list == p.end() || !list->is_array()) return Err(field + ".pretokenizers", "missing array");
    for (size_t i = 0; i < list->size(); ++i) {
      EEP_RETURN_IF_ERROR(
          LoadPreTokenizer((*list)[i], field + ".pretokenizers[" + std::to_string(i) + "]"));
    }
    return Status::Ok();
  }
  if (type == "Split") {
    std::string behavior = p.value("behavior", std::string());
    if (behavior != "Isolated") {
      return Err(field + ".behavior",
                 "unsupported Split behavior '" + behavior + "' (only Isolated is supported)");
    }
    if (p.value("invert", false)) return Err(field + ".invert", "inverted Split is not supported");
    auto pat = p.find("pattern");
    if (pat == p.end() || !pat->is_object()) {
      return Err(field + ".pattern", "missing; expected {\"Regex\": ...} or {\"String\": ...}");
    }
    PreTokenizerStep step{PreTokenizerStep::kSplit, nullptr, false};
    if (pat->contains("Regex") && (*pat)["Regex"].is_string()) {
      EEP_ASSIGN_OR_RETURN(step.regex, CompileRegex((*pat)["Regex"].get<std::string>(), false,
                                                    source + ": " + field + ".pattern.Regex"));
    } else if (pat->contains("String") && (*pat)["String"].is_string()) {
      if ((*pat)["String"].get<std::string>().empty()) {
        return Err(field + ".pattern.String", "empty");
      }
      EEP_ASSIGN_OR_RETURN(step.regex, CompileRegex((*pat)["String"].get<std::string>(), true,
                                                    source + ": " + field + ".pattern.String"));
    } else {
      return Err(field + ".pattern", "expected {\"Regex\": ...} or {\"String\": ...}");
    }
    pre_tokenizer.push_back(std::move(step));
    return Status::Ok();
  }
  if (type == "ByteLevel") {
    PreTokenizerStep step{PreTokenizerStep::kByteLevel, nullptr,
                          p.value("add_prefix_space", false)};
    if (p.value("use_regex", true)) {
      EEP_ASSIGN_OR_RETURN(step.regex, CompileRegex(kGpt2Pattern, false, source + ": " + field));
    }
    pre_tokenizer.push_back(std::move(step));
    return Status::Ok();
  }
  return Err(field + ".type", "unsupported pre-tokenizer '" + type +
                                  "' (supported: Split, ByteLevel, Sequence of those)");
}

Status Tokenizer::Impl::LoadDecoder(const json& d, const std::string& field) {
  if (!d.is_object() || !d.contains("type") || !d["type"].is_string()) {
    return Err(field, "expected an object with a string \"type\" (ByteLevel)");
  }
  std::string type = d["type"].get<std::string>();
  if (type == "ByteLevel") return Status::Ok();
  if (type == "Sequence") {
    auto list = d.find("decoders");
    if (list == d.end() || !list->is_array() || list->empty()) {
      return Err(field + ".decoders", "missing or empty array");
    }
    for (size_t i = 0; i < list->size(); ++i) {
      EEP_RETURN_IF_ERROR(LoadDecoder((*list)[i], field + ".decoders[" + std::to_string(i) + "]"));
    }
    return Status::Ok();
  }
  return Err(field + ".type", "unsupported decoder '" + type + "' (only ByteLevel is supported)");
}

std::vector<Segment> Tokenizer::Impl::SplitOnAdded(std::string text,
                                                   const AddedTokenTrie& trie) const {
  std::vector<Segment> out;
  if (trie.empty()) {
    out.push_back({std::move(text), -1});
    return out;
  }
  std::string_view s = text;
  // Whether the character starting at byte i is a word character (\w).
  auto is_word_char = [&](size_t i) {
    size_t len = Utf8CharLength(static_cast<unsigned char>(s[i]));
    MatchDataPtr md(pcre2_match_data_create_from_pattern(word_char_re.get(), nullptr));
    return md && pcre2_match(word_char_re.get(), reinterpret_cast<PCRE2_SPTR>(s.data() + i), len, 0,
                             PCRE2_NO_UTF_CHECK, md.get(), nullptr) >= 0;
  };
  auto char_start_before = [&](size_t i) {  // start of the character that ends at byte i
    do {
      --i;
    } while (i > 0 && (static_cast<unsigned char>(s[i]) & 0xC0) == 0x80);
    return i;
  };
  size_t emitted = 0;  // end of the last emitted segment
  size_t pos = 0;
  while (pos < s.size()) {
    auto [index, len] = trie.LongestAt(s, pos);
    if (index < 0) {
      ++pos;
      continue;
    }
    const AddedToken& t = added[index];
    size_t start = pos, stop = pos + len;
    if (t.single_word) {
      bool start_ok = start == 0 || !is_word_char(char_start_before(start));
      bool stop_ok = stop == s.size() || !is_word_char(stop);
      if (!start_ok || !stop_ok) {  // like HF, the rejected match's span is skipped
        pos = stop;
        continue;
      }
    }
    if (t.lstrip) {
      // Back over whitespace, but never into the previous match.
      size_t b = start;
      while (b > emitted) {
        size_t cs = char_start_before(b);
        size_t i = cs;
        if (!IsWhitespaceCp(NextCodePoint(s, &i))) break;
        b = cs;
      }
      start = b;
    }
    if (t.rstrip) {
      while (stop < s.size()) {
        size_t i = stop;
        if (!IsWhitespaceCp(NextCodePoint(s, &i))) break;
        stop = i;
      }
    }
    if (start > emitted) out.push_back({std::string(s.substr(emitted, start - emitted)), -1});
    out.push_back({std::string(), t.id});
    emitted = pos = stop;
  }
  if (emitted < s.size()) out.push_back({std::string(s.substr(emitted)), -1});
  return out;
}

Status Tokenizer::Impl::PreTokenize(const std::string& text,
                                    std::vector<std::string>* words) const {
  std::vector<std::string> pieces{text};
  std::vector<std::string_view> views;
  for (const PreTokenizerStep& step : pre_tokenizer) {
    std::vector<std::string> next;
    for (std::string& piece : pieces) {
      if (piece.empty()) continue;
      if (step.kind == PreTokenizerStep::kByteLevel && step.add_prefix_space && piece[0] != ' ') {
        piece.insert(piece.begin(), ' ');
      }
      views.clear();
      if (step.regex) {
        EEP_RETURN_IF_ERROR(SplitIsolated(step.regex.get(), piece, &views));
      } else {
        views.push_back(piece);
      }
      for (std::string_view v : views) {
        next.push_back(step.kind == PreTokenizerStep::kByteLevel ? ByteLevelEncode(v)
                                                                 : std::string(v));
      }
    }
    pieces = std::move(next);
  }
  for (std::string& p : pieces) {
    if (!p.empty()) words->push_back(std::move(p));
  }
  return Status::Ok();
}

int64_t Tokenizer::Impl::CharId(std::string_view ch) const {
  size_t i = 0;
  char32_t cp = NextCodePoint(ch, &i);
  if (cp < small_char_id.size()) return small_char_id[cp];
  auto it = vocab.find(std::string(ch));
  return it == vocab.end() ? -1 : it->second;
}

void Tokenizer::Impl::Bpe(const std::string& word, std::vector<int64_t>* ids) const {
  if (cache.Get(word, ids)) return;
  std::vector<int64_t> out;
  BpeUncached(word, &out);
  ids->insert(ids->end(), out.begin(), out.end());
  cache.Put(word, std::move(out));
}

void Tokenizer::Impl::BpeUncached(const std::string& word, std::vector<int64_t>* ids) const {
  if (ignore_merges) {
    if (auto it = vocab.find(word); it != vocab.end()) {
      ids->push_back(it->second);
      return;
    }
  }
  // Initial symbols: one per character (MODELS.md §6.5).
  struct Symbol {
    int64_t id;
    int prev, next;
    bool alive;
  };
  std::vector<Symbol> sym;
  sym.reserve(word.size());
  bool last_was_unk = false;
  for (size_t i = 0; i < word.size();) {
    size_t len = Utf8CharLength(static_cast<unsigned char>(word[i]));
    std::string_view ch(word.data() + i, len);
    i += len;
    int64_t id = CharId(ch);
    if (id >= 0) {
      sym.push_back({id, 0, 0, true});
      last_was_unk = false;
      continue;
    }
    if (byte_fallback) {
      std::vector<int64_t> byte_ids;
      for (char c : ch) {
        char buf[8];
        snprintf(buf, sizeof(buf), "<0x%02X>", static_cast<unsigned char>(c));
        auto it = vocab.find(buf);
        if (it == vocab.end()) break;
        byte_ids.push_back(it->second);
      }
      if (byte_ids.size() == ch.size()) {
        for (int64_t b : byte_ids) sym.push_back({b, 0, 0, true});
        last_was_unk = false;
        continue;
      }
    }
    if (unk_id) {
      if (!(fuse_unk && last_was_unk)) sym.push_back({*unk_id, 0, 0, true});
      last_was_unk = true;
    }
    // else: dropped, as HF does without unk/byte_fallback.
  }
  int n = static_cast<int>(sym.size());
  for (int i = 0; i < n; ++i) {
    sym[i].prev = i - 1;
    sym[i].next = i + 1 < n ? i + 1 : -1;
  }
  // Lowest rank first, leftmost on ties; stale entries are detected and skipped, as in HF.
  struct Candidate {
    int32_t rank;
    int pos;
    int64_t new_id;
    bool operator>(const Candidate& o) const {
      return rank != o.rank ? rank > o.rank : pos > o.pos;
    }
  };
  auto lookup = [&](int64_t a, int64_t b) -> const std::pair<int32_t, int64_t>* {
    auto it = merges.find((static_cast<uint64_t>(a) << 32) | static_cast<uint64_t>(b));
    return it == merges.end() ? nullptr : &it->second;
  };
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<Candidate>> queue;
  for (int i = 0; i + 1 < n; ++i) {
    if (auto* m = lookup(sym[i].id, sym[i + 1].id)) queue.push({m->first, i, m->second});
  }
  while (!queue.empty()) {
    Candidate top = queue.top();
    queue.pop();
    Symbol& left = sym[top.pos];
    if (!left.alive || left.next < 0) continue;
    Symbol& right = sym[left.next];
    auto* m = lookup(left.id, right.id);
    if (m == nullptr || m->second != top.new_id) continue;
    left.id = top.new_id;
    right.alive = false;
    left.next = right.next;
    if (right.next >= 0) sym[right.next].prev = top.pos;
    if (left.prev >= 0) {
      if (auto* pm = lookup(sym[left.prev].id, left.id)) {
        queue.push({pm->first, left.prev, pm->second});
      }
    }
    if (left.next >= 0) {
      if (auto* nm = lookup(left.id, sym[left.next].id))
        queue.push({nm->first, top.pos, nm->second});
    }
  }
  for (int i = n > 0 ? 0 : -1; i >= 0; i = sym[i].next) ids->push_back(sym[i].id);
}

// ---------------------------------------------------------------------------------------------

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::~Tokenizer() = default;

Result<std::unique_ptr<Tokenizer>> Tokenizer::FromFile(const std::string& path) {
  EEP_ASSIGN_OR_RETURN(std::string text, ReadFile(path));
  return FromJson(text, path);
}

Result<std::unique_ptr<Tokenizer>> Tokenizer::FromJson(const std::string& json_text,
                                                       const std::string& source) {
  json root;
  try {
    root = json::parse(json_text);
  } catch (const json::exception& e) {
    return Status::InvalidArgument(source + ": invalid JSON: " + e.what());
  }
  auto impl = std::make_unique<Impl>();
  impl->source = source;
  try {
    EEP_RETURN_IF_ERROR(impl->Load(root));
  } catch (const json::exception& e) {
    // Type mismatches inside fields we read with value(): report rather than throw.
    return Status::InvalidArgument(source + ": malformed tokenizer: " + e.what());
  }
  return std::unique_ptr<Tokenizer>(new Tokenizer(std::move(impl)));
}

Result<std::vector<int64_t>> Tokenizer::Encode(const std::string& text) const {
  const Impl& im = *impl_;
  if (size_t bad = FindInvalidUtf8(text); bad != std::string::npos) {
    return Status::InvalidArgument("text is not valid UTF-8 (byte offset " + std::to_string(bad) +
                                   ")");
  }
  std::vector<int64_t> ids;
  std::vector<std::string> words;
  for (Segment& raw : im.SplitOnAdded(text, im.raw_trie)) {
    if (raw.id >= 0) {
      ids.push_back(raw.id);
      continue;
    }
    std::string normalized = im.nfc ? NfcNormalize(raw.text) : std::move(raw.text);
    for (Segment& seg : im.SplitOnAdded(std::move(normalized), im.normalized_trie)) {
      if (seg.id >= 0) {
        ids.push_back(seg.id);
        continue;
      }
      words.clear();
      EEP_RETURN_IF_ERROR(im.PreTokenize(seg.text, &words));
      for (const std::string& w : words) im.Bpe(w, &ids);
    }
  }
  return ids;
}

Result<std::string> Tokenizer::Decode(const std::vector<int64_t>& ids) const {
  const Impl& im = *impl_;
  const auto& table = ByteLevel().cp_to_byte;
  std::string text, bytes;
  for (int64_t id : ids) {
    if (auto it = im.added_by_id.find(id); it != im.added_by_id.end()) {
      AppendUtf8Lossy(bytes, &text);
      bytes.clear();
      text += im.added[it->second].content;
      continue;
    }
    if (id < 0 || id >= static_cast<int64_t>(im.has_token.size()) || !im.has_token[id]) {
      return Status::InvalidArgument("token id " + std::to_string(id) +
                                     " is not in the vocabulary (vocab_size " +
                                     std::to_string(im.vocab_size) + ")");
    }
    const std::string& tok = im.id_to_token[id];
    // Byte-level tokens map char by char back to bytes; a token with any other char (one
    // that never came from the ByteLevel pre-tokenizer) contributes its UTF-8 unchanged.
    size_t mark = bytes.size();
    bool all_mapped = true;
    for (size_t i = 0; i < tok.size();) {
      auto it = table.find(NextCodePoint(tok, &i));
      if (it == table.end()) {
        all_mapped = false;
        break;
      }
      bytes.push_back(static_cast<char>(it->second));
    }
    if (!all_mapped) {
      bytes.resize(mark);
      bytes += tok;
    }
  }
  AppendUtf8Lossy(bytes, &text);
  return text;
}

int64_t Tokenizer::vocab_size() const {
  return impl_->vocab_size;
}

std::optional<int64_t> Tokenizer::TokenToId(const std::string& token) const {
  if (auto it = impl_->added_by_content.find(token); it != impl_->added_by_content.end()) {
    return impl_->added[it->second].id;
  }
  if (auto it = impl_->vocab.find(token); it != impl_->vocab.end()) return it->second;
  return std::nullopt;
}

std::optional<std::string> Tokenizer::IdToToken(int64_t id) const {
  if (auto it = impl_->added_by_id.find(id); it != impl_->added_by_id.end()) {
    return impl_->added[it->second].content;
  }
  if (id < 0 || id >= static_cast<int64_t>(impl_->has_token.size()) || !impl_->has_token[id]) {
    return std::nullopt;
  }
  return impl_->id_to_token[id];
}

const std::string& Tokenizer::source() const {
  return impl_->source;
}

}  // namespace eep
