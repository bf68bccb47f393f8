#include "eplb_test_util.h"

#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <random>

#include "core/util.h"

namespace eep::eplb::testing {

std::vector<GoldenCase> LoadGolden(const std::string& file) {
  std::vector<GoldenCase> out;
  auto doc = ReadJsonFile(std::string(EEP_TEST_DATA) + "/eplb/" + file);
  if (!doc.ok()) {
    ADD_FAILURE() << doc.status().ToString();
    return out;
  }
  for (const auto& c : *doc) {
    GoldenCase g;
    g.name = c.at("name").get<std::string>();
    g.raw = c;
    std::vector<std::vector<double>> rows = c.at("weight").get<std::vector<std::vector<double>>>();
    auto w = LoadMatrix::FromRows(rows);
    if (!w.ok()) {
      ADD_FAILURE() << g.name << ": " << w.status().ToString();
      continue;
    }
    g.weight = std::move(w).value();
    g.topo.num_replicas = c.at("num_replicas").get<int32_t>();
    g.topo.num_groups = c.at("num_groups").get<int32_t>();
    g.topo.num_nodes = c.at("num_nodes").get<int32_t>();
    g.topo.num_gpus = c.at("num_gpus").get<int32_t>();
    for (const auto& row : c.at("phy2log")) {
      for (const auto& v : row) g.phy2log.push_back(v.get<int32_t>());
    }
    for (const auto& layer : c.at("log2phy")) {
      for (const auto& row : layer) {
        g.max_cnt = static_cast<int32_t>(row.size());
        for (const auto& v : row) g.log2phy.push_back(v.get<int32_t>());
      }
    }
    for (const auto& row : c.at("logcnt")) {
      for (const auto& v : row) g.logcnt.push_back(v.get<int32_t>());
    }
    g.balancedness = c.at("balancedness").get<double>();
    g.reference_seconds = c.at("reference_seconds_median").get<double>();
    out.push_back(std::move(g));
  }
  return out;
}

LoadMatrix Perturb(const LoadMatrix& w, double noise, uint32_t seed) {
  std::mt19937 rng(seed);
  LoadMatrix out = w;
  for (float& v : out.values) {
    const double u = static_cast<double>(rng() >> 8) / static_cast<double>(1u << 24);
    v = static_cast<float>(v * (1.0 + noise * (2.0 * u - 1.0)));
  }
  return out;
}

std::string RunCommand(const std::string& command, int* exit_code) {
  std::string output;
  FILE* pipe = popen((command + " 2>&1").c_str(), "r");
  if (!pipe) {
    *exit_code = -1;
    return output;
  }
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), pipe)) > 0) output.append(buf, n);
  const int status = pclose(pipe);
  *exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return output;
}

std::string TempPath(const std::string& name) {
  std::filesystem::path dir =
      std::filesystem::temp_directory_path() / ("eep_eplb_test_" + std::to_string(getpid()));
  std::filesystem::create_directories(dir);
  return (dir / name).string();
}

}  // namespace eep::eplb::testing
