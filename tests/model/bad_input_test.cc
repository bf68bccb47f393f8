// Bad input through the real binary: non-zero exit and a one-line message naming the problem.
#include <gtest/gtest.h>

#include <filesystem>
#include <fmt/format.h>
#include <fstream>

#include "core/util.h"
#include "model/safetensors.h"
#include "test_util.h"

namespace eep {
namespace {

namespace fs = std::filesystem;

// A copy of a golden model in a temp dir that a test may damage.
std::string CopyModel(const std::string& name) {
  std::string dir = test::TempDir("bad") + "/" + name;
  fs::create_directories(dir);
  for (const auto& e : fs::directory_iterator(test::ModelDir(name)))
    fs::copy_file(e.path(), dir + "/" + e.path().filename().string());
  for (const auto& e : fs::directory_iterator(dir))
    fs::permissions(e.path(), fs::perms::owner_read | fs::perms::owner_write, fs::perm_options::add);
  return dir;
}

// Exit non-zero, stderr is one line, containing every needle.
void ExpectOneLineError(const test::CommandResult& r, const std::vector<std::string>& needles) {
  EXPECT_NE(r.exit_code, 0);
  std::string err = r.err;
  while (!err.empty() && err.back() == '\n') err.pop_back();
  EXPECT_EQ(err.find('\n'), std::string::npos) << "not one line: " << r.err;
  for (const auto& n : needles) EXPECT_NE(r.err.find(n), std::string::npos) << "missing '" << n << "' in: " << r.err;
}

std::string LogitsCmd(const std::string& dir, const std::string& ids = "1,2,3") {
  return fmt::format("logits --model {} --prompt-ids {} --out {}/out.safetensors", dir, ids, dir);
}

// Rewrites the header of model.safetensors through `edit`, keeping the data section.
void EditHeader(const std::string& path, const std::function<void(nlohmann::json&)>& edit) {
  auto bytes = ReadFile(path);
  ASSERT_TRUE(bytes.ok());
  uint64_t hlen;
  std::memcpy(&hlen, bytes->data(), 8);
  auto header = nlohmann::json::parse(bytes->substr(8, hlen));
  edit(header);
  std::string h = header.dump();
  while (h.size() % 8 != 0) h.push_back(' ');
  uint64_t new_len = h.size();
  std::string out(reinterpret_cast<const char*>(&new_len), 8);
  out += h + bytes->substr(8 + hlen);  // offsets are relative to the data section
  ASSERT_TRUE(WriteFile(path, out).ok());
}

TEST(BadInput, TruncatedSafetensors) {
  std::string dir = CopyModel("qwen3moe-tiny");
  std::string path = dir + "/model.safetensors";
  fs::resize_file(path, fs::file_size(path) - 1000);
  ExpectOneLineError(test::RunEep(LogitsCmd(dir)), {"model.safetensors", "truncated"});
  // Truncated inside the header itself.
  fs::resize_file(path, 100);
  ExpectOneLineError(test::RunEep(LogitsCmd(dir)), {"model.safetensors", "header"});
}

TEST(BadInput, OffsetsOutOfRange) {
  std::string dir = CopyModel("qwen3moe-tiny");
  EditHeader(dir + "/model.safetensors", [](nlohmann::json& h) {
    auto& t = h["model.norm.weight"];
    uint64_t end = t["data_offsets"][1].get<uint64_t>();
    t["data_offsets"] = {end + 100000000, end + 100000000 + 256};
  });
  ExpectOneLineError(test::RunEep(LogitsCmd(dir)), {"model.norm.weight", "data_offsets"});
}

TEST(BadInput, OverlappingTensors) {
  std::string dir = CopyModel("qwen3moe-tiny");
  EditHeader(dir + "/model.safetensors", [](nlohmann::json& h) {
    h["model.norm.weight"]["data_offsets"] = h["model.layers.0.input_layernorm.weight"]["data_offsets"];
  });
  ExpectOneLineError(test::RunEep(LogitsCmd(dir)), {"overlap"});
}

TEST(BadInput, WrongDtypeForTensor) {
  std::string dir = CopyModel("qwen3moe-tiny");
  // I32 has 4 bytes per element: the size check catches it before the dtype check...
  EditHeader(dir + "/model.safetensors", [](nlohmann::json& h) { h["model.norm.weight"]["dtype"] = "I32"; });
  ExpectOneLineError(test::RunEep(LogitsCmd(dir)), {"model.norm.weight"});
  // ... while a same-size integer dtype is caught by the loader's dtype check.
  dir = CopyModel("qwen3moe-tiny");
  EditHeader(dir + "/model.safetensors", [](nlohmann::json& h) {
    auto& t = h["model.norm.weight"];
    t["dtype"] = "U8";
    t["shape"] = {256};
  });
  ExpectOneLineError(test::RunEep(LogitsCmd(dir)), {"model.norm.weight", "dtype"});
}

TEST(BadInput, WrongShape) {
  std::string dir = CopyModel("mixtral-tiny");
  EditHeader(dir + "/model.safetensors", [](nlohmann::json& h) {
    h["model.layers.0.block_sparse_moe.gate.weight"]["shape"] = {128, 8};
  });
  ExpectOneLineError(test::RunEep(LogitsCmd(dir)), {"model.layers.0.block_sparse_moe.gate.weight", "shape"});
}

TEST(BadInput, UnknownArchitecture) {
  std::string dir = CopyModel("qwen3moe-tiny");
  auto cfg = ReadJsonFile(dir + "/config.json");
  (*cfg)["model_type"] = "llama4_moe";
  ASSERT_TRUE(WriteFile(dir + "/config.json", cfg->dump()).ok());
  ExpectOneLineError(test::RunEep(LogitsCmd(dir)), {"config.json", "llama4_moe", "qwen3_moe"});
}

TEST(BadInput, MissingTensorListsExpected) {
  std::string dir = CopyModel("deepseekv3-tiny");
  EditHeader(dir + "/model.safetensors", [](nlohmann::json& h) {
    auto v = h["model.layers.1.mlp.experts.3.up_proj.weight"];
    h.erase("model.layers.1.mlp.experts.3.up_proj.weight");
    h["model.layers.1.mlp.experts.3.up_proj.weigh"] = v;  // a typo'd name
  });
  ExpectOneLineError(test::RunEep(LogitsCmd(dir)), {"model.layers.1.mlp.experts.3.up_proj.weight", "deepseek_v3"});
}

TEST(BadInput, FP8Rejected) {
  std::string dir = CopyModel("qwen3moe-tiny");
  EditHeader(dir + "/model.safetensors", [](nlohmann::json& h) {
    auto& t = h["model.norm.weight"];
    t["dtype"] = "F8_E4M3";
    t["shape"] = {256};
  });
  ExpectOneLineError(test::RunEep(LogitsCmd(dir)), {"model.norm.weight", "FP8"});
}

TEST(BadInput, PromptIdsOutOfVocabulary) {
  std::string dir = test::ModelDir("qwen3moe-tiny");
  std::string out = test::TempDir("oov");
  ExpectOneLineError(test::RunEep(fmt::format("logits --model {} --prompt-ids 1,512 --out {}/x.safetensors", dir, out)),
                     {"512", "vocabulary"});
  ExpectOneLineError(test::RunEep(fmt::format("generate --model {} --prompt-ids 5,-1 --max-new-tokens 2", dir)),
                     {"-1", "vocabulary"});
  ExpectOneLineError(test::RunEep(fmt::format("generate --model {} --prompt-ids 5,x --max-new-tokens 2", dir)),
                     {"--prompt-ids", "x"});
}

TEST(BadInput, ModelDirectoryMissing) {
  ExpectOneLineError(test::RunEep(LogitsCmd("/nonexistent/model")), {"/nonexistent/model"});
}

}  // namespace
}  // namespace eep
