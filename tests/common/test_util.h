// Helpers shared by model tests: golden data paths and running the eep binary.
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace eep::test {

inline std::string DataDir() { return EEP_TEST_DATA; }
inline std::string ModelDir(const std::string& name) { return DataDir() + "/models/" + name; }

struct CommandResult {
  int exit_code = -1;
  std::string out;  // stdout
  std::string err;  // stderr
};

// Runs `EEP_BIN args` through the shell, capturing stdout and stderr.
CommandResult RunEep(const std::string& args);

// A fresh temporary directory, removed by the caller if it wishes.
std::string TempDir(const std::string& tag);

// One prompt of tests/data/models/NAME/golden.json.
struct GoldenPrompt {
  std::vector<int64_t> ids, greedy;
  double min_margin = 0;  // golden's smallest top-1/top-2 logit gap over the greedy steps
};
// The golden prompts of model NAME (empty if golden.json is missing or malformed).
std::vector<GoldenPrompt> LoadGoldenPrompts(const std::string& model);

// Largest element-wise difference of got against ref: abs = max|got-ref|, rel = abs /
// max(1, max|ref|). Both are infinite when the sizes differ.
struct MaxErr {
  double abs = 0, rel = 0;
};
MaxErr CompareMax(const std::vector<float>& got, const std::vector<float>& ref);
inline double RelErr(const std::vector<float>& got, const std::vector<float>& ref) { return CompareMax(got, ref).rel; }

// Tensor NAME of a SafetensorsFile (src/model/safetensors.h; a template so that this library
// needs no model headers) as f32; empty if absent or not convertible.
template <typename File>
std::vector<float> ReadTensorF32(const File& f, const std::string& name) {
  auto it = f.tensors().find(name);
  if (it == f.tensors().end()) return {};
  std::vector<float> v(static_cast<size_t>(it->second.numel()));
  if (!ConvertToF32(it->second.dtype, it->second.data, v.size(), v.data()).ok()) return {};
  return v;
}

}  // namespace eep::test
