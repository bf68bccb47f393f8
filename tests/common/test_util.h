// Helpers shared by model tests: golden data paths and running the eep binary.
#pragma once

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

}  // namespace eep::test
