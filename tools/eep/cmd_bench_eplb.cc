// `eep bench eplb`: planner time on the golden cases against the Python reference's median
// time recorded with them (reference_seconds_median), plus min-move mode on perturbed loads.
#include <fmt/core.h>
#include <time.h>

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "command.h"
#include "core/util.h"
#include "eplb/eplb.h"

namespace {

namespace fs = std::filesystem;
using eep::eplb::LoadMatrix;
using eep::eplb::Placement;

struct BenchFlags {
  std::vector<std::string> inputs;
  int repeats = 21;
  int min_move_repeats = 5;
  double noise = 0.2;
  uint32_t seed = 42;
  double target = 100.0;
};

// The golden file lives in the source tree; look for it from the working directory and from
// the binary's location (build-*/bin/eep), so the bench runs from either without flags.
std::string FindDefaultInput() {
  const fs::path rel = fs::path("tests") / "data" / "eplb" / "eplb_large.json";
  std::vector<fs::path> starts = {fs::current_path()};
  std::error_code ec;
  fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  if (!ec) starts.push_back(exe.parent_path());
  for (fs::path dir : starts) {
    for (int up = 0; up < 6 && !dir.empty(); ++up) {
      if (fs::exists(dir / rel, ec)) return (dir / rel).string();
      if (dir == dir.parent_path()) break;
      dir = dir.parent_path();
    }
  }
  return rel.string();
}

// CPU time of this thread: on a shared machine it shows the planner's own cost, while the wall
// time (which the ratio uses) also counts time the thread was not scheduled.
double ThreadCpuSeconds() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

bool SameAsGolden(const nlohmann::json& c, const Placement& p) {
  std::vector<int32_t> phy2log, log2phy, logcnt;
  for (const auto& row : c.at("phy2log")) {
    for (const auto& v : row) phy2log.push_back(v.get<int32_t>());
  }
  for (const auto& layer : c.at("log2phy")) {
    for (const auto& row : layer) {
      for (const auto& v : row) log2phy.push_back(v.get<int32_t>());
    }
  }
  for (const auto& row : c.at("logcnt")) {
    for (const auto& v : row) logcnt.push_back(v.get<int32_t>());
  }
  return phy2log == p.phy2log && log2phy == p.log2phy && logcnt == p.logcnt;
}

// Each load times a factor in [1 - noise, 1 + noise]; bit-reproducible for a seed.
LoadMatrix Perturb(const LoadMatrix& w, double noise, uint32_t seed) {
  std::mt19937 rng(seed);
  LoadMatrix out = w;
  for (float& v : out.values) {
    const double u = static_cast<double>(rng() >> 8) / static_cast<double>(1u << 24);
    v = static_cast<float>(v * (1.0 + noise * (2.0 * u - 1.0)));
  }
  return out;
}

int RunBench(const BenchFlags& flags) {
  std::vector<std::string> inputs = flags.inputs;
  if (inputs.empty()) inputs.push_back(FindDefaultInput());
  bool all_match = true;
  double worst_ratio = 1e300;
  fmt::print(
      "{:<18} {:>9} {:>5} {:>9} {:>9} {:>10} {:>8} {:>6} | {:>10} {:>7} {:>11} {:>7} {:>9}\n",
      "case", "LxE", "R", "ours_ms", "cpu_ms", "ref_ms", "ratio", "match", "minmove_ms", "moved",
      "fresh_moved", "bal", "fresh_bal");
  for (const std::string& path : inputs) {
    auto cases = eep::ReadJsonFile(path);
    if (!cases.ok()) {
      return eep::cli::Fail(
          cases.status().WithContext("--input (golden cases; pass the path of "
                                     "tests/data/eplb/eplb_large.json)"));
    }
    if (!cases->is_array()) {
      return eep::cli::Fail(eep::Status::InvalidArgument(path + ": expected a list of cases"));
    }
    for (const nlohmann::json& c : *cases) {
      const std::string name = c.value("name", std::string("?"));
      auto req = eep::eplb::ParsePlanRequest(c);
      if (!req.ok()) return eep::cli::Fail(req.status().WithContext(path + ": " + name));
      const LoadMatrix& w = req->weight;
      const eep::eplb::Topology& topo = req->topo;

      std::vector<double> times, cpu_times;
      Placement plan;
      for (int i = 0; i < flags.repeats + 1; ++i) {
        const double c0 = ThreadCpuSeconds();
        const double t0 = eep::NowSeconds();
        auto p = eep::eplb::RebalanceExperts(w, topo);
        const double t1 = eep::NowSeconds();
        const double c1 = ThreadCpuSeconds();
        if (!p.ok()) return eep::cli::Fail(p.status().WithContext(name));
        if (i > 0) {  // the first run warms caches and the allocator
          times.push_back(t1 - t0);
          cpu_times.push_back(c1 - c0);
        }
        plan = std::move(p).value();
      }
      const double ours = Median(times);
      bool match = false;
      try {
        match = SameAsGolden(c, plan);
      } catch (const std::exception& e) {
        EEP_LOG_WARN("{}: golden plan unreadable: {}", name, e.what());
      }
      all_match &= match;
      const double ref = c.value("reference_seconds_median", 0.0);
      const double ratio = ours > 0 ? ref / ours : 0;
      if (ref > 0) worst_ratio = std::min(worst_ratio, ratio);

      // Min-move: the old placement is the fresh plan of the recorded loads; the loads then
      // drift by up to ±noise.
      const LoadMatrix drifted = Perturb(w, flags.noise, flags.seed);
      std::vector<double> mm_times;
      eep::eplb::MinMoveResult mm;
      for (int i = 0; i < flags.min_move_repeats; ++i) {
        const double t0 = eep::NowSeconds();
        auto r = eep::eplb::RebalanceMinMove(drifted, topo, plan.phy2log);
        const double t1 = eep::NowSeconds();
        if (!r.ok()) return eep::cli::Fail(r.status().WithContext(name + " min-move"));
        mm_times.push_back(t1 - t0);
        mm = std::move(r).value();
      }
      fmt::print(
          "{:<18} {:>9} {:>5} {:>9.3f} {:>9.3f} {:>10.2f} {:>7.0f}x {:>6} | {:>10.2f} {:>7} "
          "{:>11} {:>7.4f} {:>9.4f}\n",
          name, fmt::format("{}x{}", w.num_layers, w.num_experts), topo.num_replicas, ours * 1e3,
          Median(cpu_times) * 1e3, ref * 1e3, ratio, match ? "yes" : "NO", Median(mm_times) * 1e3,
          mm.moved_experts, mm.fresh_moved_experts, mm.balancedness, mm.fresh_balancedness);
    }
  }
  if (worst_ratio < 1e300) {
    fmt::print("worst speedup vs reference (wall-clock medians): {:.0f}x (target {:.0f}x): {}\n",
               worst_ratio, flags.target, worst_ratio >= flags.target ? "met" : "NOT met");
  }
  if (!all_match) {
    EEP_LOG_ERROR("eplb bench: some plans differ from the golden reference");
    return 1;
  }
  return 0;
}

}  // namespace

EEP_REGISTER_BENCH(
    eplb, "eplb", "EPLB planner time vs the Python reference (golden cases), and min-move mode",
    [](CLI::App* app) -> std::function<int()> {
      auto flags = std::make_shared<BenchFlags>();
      app->add_option("--input", flags->inputs,
                      "golden case files (default: tests/data/eplb/eplb_large.json, found from "
                      "the working directory or the binary)");
      app->add_option("--repeats", flags->repeats, "timed runs per case (median reported)")
          ->capture_default_str()
          ->check(CLI::PositiveNumber);
      app->add_option("--min-move-repeats", flags->min_move_repeats, "timed min-move runs per case")
          ->capture_default_str()
          ->check(CLI::PositiveNumber);
      app->add_option("--noise", flags->noise, "relative load drift for min-move (±)")
          ->capture_default_str();
      app->add_option("--seed", flags->seed, "seed of the load drift")->capture_default_str();
      return [flags]() { return RunBench(*flags); };
    });
