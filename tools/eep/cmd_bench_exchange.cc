// eep bench exchange: EPLB weight exchange between ranks vs the communicator's raw ceiling
// measured in the same run, and the serving stall of a synchronous vs an async rebalance.
#include <filesystem>
#include <fmt/format.h>

#include "command.h"
#include "core/util.h"
#include "ep/ep.h"
#include "model/make_model.h"

namespace {

struct BenchExchangeCli {
  std::string model_dir;
  int ep = 4;
  std::string communicator = "shm";
  std::string backend = "cpu";
  int layers = 4, hidden = 512, experts = 32, moe_intermediate = 512;
  int repeats = 3;
  std::string rank_log_level = "warn";
};

// Every expert moves to the next rank: slot s takes the expert of slot s - slots_per_rank.
std::vector<std::vector<int32_t>> Rotate(const eep::ExpertMap& map, int64_t shift) {
  std::vector<std::vector<int32_t>> rows = map.phy2log();
  for (auto& row : rows) {
    std::vector<int32_t> r(row.size());
    for (size_t s = 0; s < row.size(); ++s)
      r[(s + static_cast<size_t>(shift)) % row.size()] = row[s];
    row = r;
  }
  return rows;
}

int RunBench(BenchExchangeCli& c) {
  std::string dir = c.model_dir;
  if (dir.empty()) {
    dir = fmt::format("/tmp/eep-bench-exchange-{}x{}x{}x{}", c.layers, c.hidden, c.experts, c.moe_intermediate);
    if (!std::filesystem::exists(dir + "/config.json")) {
      eep::MakeModelOptions o;
      o.num_layers = c.layers, o.hidden_size = c.hidden, o.num_experts = c.experts;
      o.moe_intermediate_size = c.moe_intermediate, o.num_heads = 8, o.num_kv_heads = 2, o.head_dim = 64;
      o.seed = 1;
      if (auto st = eep::MakeModel(o, dir); !st.ok()) return eep::cli::Fail(st);
    }
  }
  eep::ep::EpOptions opts;
  opts.ep_size = c.ep;
  opts.communicator = c.communicator;
  opts.backend = c.backend;
  opts.eplb_async = true;  // a second communicator for the background exchange
  opts.log_level = c.rank_log_level;
  auto engine = eep::ep::EpEngine::Start(dir, opts);
  if (!engine.ok()) return eep::cli::Fail(engine.status());
  auto& e = **engine;
  const int64_t shift = e.layout().slots_per_rank;
  eep::ep::SeqInput in;
  in.new_ids = {1, 2, 3, 4, 5, 6, 7, 8};
  auto step = [&]() -> eep::Status {
    auto r = e.Step({in});
    if (!r.ok()) return r.status();
    in.new_ids.assign(1, r->at(0).token);
    return eep::Status::Ok();
  };
  if (auto st = step(); !st.ok()) return eep::cli::Fail(st);

  // 1. Synchronous exchange: every expert to the next rank (the stall is the whole exchange).
  double best_sync_s = 1e30, sync_gbps = 0;
  int64_t bytes = 0;
  for (int i = 0; i < c.repeats; ++i) {
    auto stats = e.ApplyPlacement(Rotate(e.expert_map(), shift));
    if (!stats.ok()) return eep::cli::Fail(stats.status());
    bytes = stats->bytes;
    if (stats->seconds < best_sync_s) best_sync_s = stats->seconds;
    if (auto st = step(); !st.ok()) return eep::cli::Fail(st);
  }
  sync_gbps = static_cast<double>(bytes) / best_sync_s / 1e9;
  // 2. Raw ceiling of the same communicator, same volume per rank in the same ring pattern.
  const int64_t per_rank = bytes / std::max(1, c.ep);
  auto ring = e.BenchRing(per_rank, c.repeats);
  if (!ring.ok()) return eep::cli::Fail(ring.status());
  const double raw_gbps = static_cast<double>(bytes) / *ring / 1e9;
  // 3. Async: exchange in the background while decoding; only the switch blocks.
  double best_async_stall = 1e30;
  for (int i = 0; i < c.repeats; ++i) {
    auto stats = e.ApplyPlacement(Rotate(e.expert_map(), shift), true);
    if (!stats.ok()) return eep::cli::Fail(stats.status());
    const size_t before = e.rebalances().size();
    for (int k = 0; k < 100000 && e.rebalances().size() == before; ++k)
      if (auto st = step(); !st.ok()) return eep::cli::Fail(st);
    if (e.rebalances().size() == before) return eep::cli::Fail(eep::Status::Internal("async rebalance never switched"));
    best_async_stall = std::min(best_async_stall, e.rebalances().back().stall_seconds);
  }
  e.Shutdown();
  // CUDA ranks send their device slots (BF16): GPU to GPU where the communicator can (nccl),
  // else through the host; the raw ceiling is then the same communicator between device buffers.
  fmt::print("eep bench exchange: {} {} ranks, communicator {}, {:.1f} MiB moved per rebalance (every expert to the next rank)\n",
             c.ep, c.backend == "cuda" ? "CUDA" : "CPU", c.communicator, static_cast<double>(bytes) / (1 << 20));
  fmt::print("  EPLB exchange (sync, plan→switch)   {:8.2f} GB/s\n", sync_gbps);
  const bool device_ring = c.backend == "cuda" && c.communicator == "nccl";
  fmt::print("  raw {} {} ring, same bytes{} {:8.2f} GB/s\n", c.communicator,
             device_ring ? "send/recv (device)" : "AllToAllV (host)", device_ring ? "" : " ", raw_gbps);
  fmt::print("  ratio exchange / raw                {:8.2f}\n", sync_gbps / raw_gbps);
  fmt::print("  stall: sync {:.2f} ms, async {:.2f} ms, async/sync {:.3f}\n", best_sync_s * 1000, best_async_stall * 1000,
             best_async_stall / best_sync_s);
  return 0;
}

EEP_REGISTER_BENCH(exchange, "exchange", "EPLB weight exchange vs raw communicator; sync vs async stall",
                   [](CLI::App* app) -> std::function<int()> {
                     auto c = std::make_shared<BenchExchangeCli>();
                     app->add_option("--model", c->model_dir, "checkpoint (default: a make-model one under /tmp)");
                     app->add_option("--ep", c->ep, "ranks")->check(CLI::Range(2, 64));
                     app->add_option("--ep-communicator", c->communicator, "shm | ucx | nccl");
                     app->add_option("--backend", c->backend, "where every rank computes: cpu | cuda")
                         ->check(CLI::IsMember({"cpu", "cuda"}));
                     app->add_option("--layers", c->layers, "make-model layers");
                     app->add_option("--hidden", c->hidden, "make-model hidden size");
                     app->add_option("--experts", c->experts, "make-model experts");
                     app->add_option("--moe-intermediate", c->moe_intermediate, "make-model expert size");
                     app->add_option("--repeats", c->repeats, "repetitions (best is reported)");
                     app->add_option("--rank-log-level", c->rank_log_level, "log level of the ranks (debug: exchange phases)");
                     return [c] { return RunBench(*c); };
                   });

}  // namespace
