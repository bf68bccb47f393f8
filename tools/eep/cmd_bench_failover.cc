// eep bench failover: one rank SIGKILLed in the middle of a decode step, and how long serving
// stops. A steady decode load of --seqs greedy sequences runs on --ep CPU rank processes; at
// step --kill-after-steps a second thread SIGKILLs --kill-rank's process --kill-delay-ms after
// the Step call began (so the kill lands while the ranks compute), and the bench reports
//   interruption   wall clock from the kill to that Step returning its tokens (the step is
//                  re-run after the recovery, so this is kill → next token)
//   phases         the engine's MembershipEvent: detect, abort, plan, restore, resume
//   restore        bytes by source (DRAM backup / peers / disk) and GB/s, against the raw
//                  ceiling of that source measured in the same run before the kill on the same
//                  bytes: a streaming copy of a buffer of that size (backup: what the shm mirror
//                  is), the backup client's own fetch of the same experts, EpEngine::BenchRing
//                  (peers), and a warm-page-cache checkpoint read of the same tensors (disk)
// and the steady-state step time before and after, with the anchors of the issue as ratios:
// SGLang + Mooncake 6.2–6.8 s per failure, and a fixed 30 s heartbeat timeout.
#include <poll.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fmt/format.h>
#include <map>
#include <nlohmann/json.hpp>
#include <thread>

#include "backup/backup.h"
#include "backup/sidecar.h"
#include "bench_buffer.h"
#include "command.h"
#include "core/util.h"
#include "ep/ep.h"
#include "model/config.h"
#include "model/safetensors.h"
#include "transfer/copy.h"

namespace {

using eep::Result;
using eep::Status;

// Anchors from the issue (measured elsewhere, not in this run).
constexpr double kSglangMooncakeLowS = 6.2, kSglangMooncakeHighS = 6.8;
constexpr double kHeartbeatTimeoutS = 30.0;

struct FailoverFlags {
  std::string model;
  int ep = 4;
  std::string communicator = "shm";
  std::string backend = "cpu";  // cpu | cuda: where every rank computes (cuda: ranks share GPU 0
                                // over shm/ucx, or one GPU each over nccl)
  int seqs = 16;
  int kill_rank = 2;
  int kill_after_steps = 12;
  int kill_delay_ms = 5;
  std::string backup = "on";
  int repeat = 3;
  int steps_after = 6;
  bool json = false;
  std::string rank_log_level = "warn";
};

using Buffer = eep::cli::BenchBuffer;

double Median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// The experts only `rank` holds, per MoE layer: what a failover of it has to restore.
std::vector<std::vector<int64_t>> Orphans(const eep::ep::EpEngine& e, int rank_position) {
  const auto& map = e.expert_map();
  const auto& layout = e.layout();
  std::vector<std::vector<int64_t>> out(static_cast<size_t>(map.num_moe_layers()));
  for (int64_t l = 0; l < map.num_moe_layers(); ++l)
    for (int64_t s = layout.FirstSlot(rank_position); s < layout.FirstSlot(rank_position) + layout.slots_per_rank; ++s) {
      const int32_t x = map.LogicalAt(l, s);
      if (x < 0) continue;
      bool elsewhere = false;
      for (int32_t r : map.Replicas(l, x)) elsewhere |= layout.RankOfSlot(r) != rank_position;
      auto& row = out[static_cast<size_t>(l)];
      if (!elsewhere && std::find(row.begin(), row.end(), x) == row.end()) row.push_back(x);
    }
  return out;
}

// Ceilings on the orphans' bytes, measured on the live engine before the kill (best of 3).
struct Ceilings {
  int64_t bytes = 0;             // the orphans' checkpoint bytes (BF16)
  double copy_gbps = 0;          // StreamingCopy of a buffer of that size
  double memcpy_gbps = 0;        // glibc memcpy of the same
  double fetch_gbps = 0;         // ExpertBackupClient::FetchLogicalExperts of the same experts
  double fetch_convert_gbps = 0; // the same + BF16→F32 (what a rank does with them)
  double ring_gbps = 0;          // EpEngine::BenchRing, the same total bytes
  double disk_gbps = 0;          // Checkpoint::ReadF32 of the same tensors, page cache warm
};

Result<Ceilings> MeasureCeilings(eep::ep::EpEngine& e, const std::string& model, const std::string& backup_endpoint,
                                 const std::vector<std::vector<int64_t>>& orphans) {
  constexpr int kRounds = 3;
  Ceilings c;
  const eep::ModelConfig& config = e.config();
  const auto moe_layers = config.MoeLayers();
  EEP_ASSIGN_OR_RETURN(auto ckpt, eep::Checkpoint::Open(model));
  std::vector<const eep::TensorInfo*> tensors;
  for (size_t l = 0; l < orphans.size(); ++l)
    for (int64_t x : orphans[l])
      for (const auto& name : config.ExpertTensorNames(moe_layers[l], x)) {
        EEP_ASSIGN_OR_RETURN(const eep::TensorInfo* t, ckpt->Get(name));
        tensors.push_back(t);
        c.bytes += static_cast<int64_t>(t->nbytes);
      }
  if (c.bytes == 0) return c;
  const size_t n = static_cast<size_t>(c.bytes);
  {
    Buffer src(n), dst(n);
    if (!src.data || !dst.data) return Status::ResourceExhausted("cannot allocate ceiling buffers");
    double best_stream = 1e30, best_memcpy = 1e30;
    for (int r = 0; r < kRounds; ++r) {
      double t0 = eep::NowSeconds();
      eep::transfer::StreamingCopy(dst.data, src.data, n);
      best_stream = std::min(best_stream, eep::NowSeconds() - t0);
      t0 = eep::NowSeconds();
      std::memcpy(dst.data, src.data, n);
      best_memcpy = std::min(best_memcpy, eep::NowSeconds() - t0);
    }
    c.copy_gbps = static_cast<double>(n) / best_stream / 1e9;
    c.memcpy_gbps = static_cast<double>(n) / best_memcpy / 1e9;
  }
  // Disk (warm): what a rank does for an orphan without backup or peer: read + convert.
  {
    const auto shapes = config.ExpertTensorShapes();
    double best = 1e30;
    for (int r = 0; r < kRounds; ++r) {
      const double t0 = eep::NowSeconds();
      for (size_t l = 0; l < orphans.size(); ++l)
        for (int64_t x : orphans[l]) {
          const auto names = config.ExpertTensorNames(moe_layers[l], x);
          for (int m = 0; m < 3; ++m) {
            EEP_ASSIGN_OR_RETURN(auto part, ckpt->ReadF32(names[static_cast<size_t>(m)], shapes[static_cast<size_t>(m)]));
            (void)part;
          }
        }
      best = std::min(best, eep::NowSeconds() - t0);
    }
    c.disk_gbps = static_cast<double>(n) / best / 1e9;
  }
  // The communicator's ring, the same total bytes spread over the ranks (as bench exchange).
  {
    const int ranks = std::max(1, static_cast<int>(e.Cluster().ranks.size()));
    EEP_ASSIGN_OR_RETURN(double s, e.BenchRing(c.bytes / ranks, kRounds));
    c.ring_gbps = static_cast<double>(c.bytes) / s / 1e9;
  }
  if (!backup_endpoint.empty()) {
    eep::backup::BackupClientOptions o;
    o.endpoints = {backup_endpoint};
    o.expected_fingerprint = ckpt->Fingerprint();
    o.timeout_ms = 60000;
    eep::backup::ExpertBackupClient client(o);
    EEP_RETURN_IF_ERROR_CTX(client.Connect(), "backup client");
    Buffer dst(n);
    std::vector<float> f32(n / 2);
    double best_fetch = 1e30, best_convert = 1e30;
    for (int r = 0; r < kRounds; ++r) {
      const double t0 = eep::NowSeconds();
      size_t off = 0;
      for (size_t l = 0; l < orphans.size(); ++l) {
        if (orphans[l].empty()) continue;
        eep::backup::FetchDestinations dest;
        for (int64_t x : orphans[l])
          for (const auto& name : config.ExpertTensorNames(moe_layers[l], x)) {
            const uint64_t nb = ckpt->Find(name)->nbytes;
            dest[name] = {dst.data + off, nb};
            off += nb;
          }
        EEP_RETURN_IF_ERROR_CTX(client.FetchLogicalExperts(moe_layers[l], orphans[l], "", dest), "backup fetch");
      }
      const double t1 = eep::NowSeconds();
      EEP_RETURN_IF_ERROR(eep::ConvertToF32(tensors.front()->dtype, dst.data, n / 2, f32.data()));
      const double t2 = eep::NowSeconds();
      best_fetch = std::min(best_fetch, t1 - t0);
      best_convert = std::min(best_convert, t2 - t0);
    }
    c.fetch_gbps = static_cast<double>(n) / best_fetch / 1e9;
    c.fetch_convert_gbps = static_cast<double>(n) / best_convert / 1e9;
  }
  return c;
}

struct RunResult {
  double steady_step_s = 0, steady_tokens_per_s = 0;  // before the kill, 4 ranks
  double after_step_s = 0;                            // after it, survivors
  double interruption_s = 0;                          // kill → the step's tokens returned
  double kill_into_step_s = 0;                        // Step call → kill
  double exit_s = -1;                                 // kill → its pidfd readable (the kernel's teardown)
  bool mid_step = false;                              // the kill landed before the Step returned
  double start_s = 0;
  eep::ep::MembershipEvent ev;
  Ceilings ceil;
};

Result<RunResult> RunOnce(const FailoverFlags& f, const std::string& backup_endpoint) {
  RunResult res;
  eep::ep::EpOptions opts;
  opts.ep_size = f.ep;
  opts.communicator = f.communicator;
  opts.backend = f.backend;
  opts.log_level = f.rank_log_level;
  if (!backup_endpoint.empty()) opts.backup_endpoints = {backup_endpoint};
  const double t_start = eep::NowSeconds();
  EEP_ASSIGN_OR_RETURN(auto engine, eep::ep::EpEngine::Start(f.model, opts));
  res.start_s = eep::NowSeconds() - t_start;
  auto& e = *engine;
  if (!backup_endpoint.empty() && !e.Cluster().backup_ready)
    return Status::Unavailable("ranks did not reach the backup manager: " + e.Cluster().backup_health);

  // --seqs sequences with distinct 8-token prompts, then greedy decode, all in every step.
  std::vector<eep::ep::SeqInput> inputs(static_cast<size_t>(f.seqs));
  const int64_t vocab = std::min<int64_t>(e.config().vocab_size, 500);
  for (int i = 0; i < f.seqs; ++i) {
    inputs[static_cast<size_t>(i)].seq_id = i;
    for (int k = 0; k < 8; ++k) inputs[static_cast<size_t>(i)].new_ids.push_back(1 + (i * 37 + k * 11) % (vocab - 1));
  }
  auto step = [&]() -> Result<double> {
    const double t0 = eep::NowSeconds();
    EEP_ASSIGN_OR_RETURN(auto outs, e.Step(inputs));
    const double dt = eep::NowSeconds() - t0;
    if (outs.size() != inputs.size()) return Status::Internal("one output per sequence expected");
    for (size_t i = 0; i < outs.size(); ++i) inputs[i].new_ids.assign(1, outs[i].token);
    return dt;
  };
  EEP_RETURN_IF_ERROR(step().status());  // prefill
  std::vector<double> steady;
  for (int s = 1; s < f.kill_after_steps; ++s) {
    EEP_ASSIGN_OR_RETURN(double dt, step());
    if (s >= 2) steady.push_back(dt);  // the first decode step warms up
  }
  res.steady_step_s = Median(steady);
  res.steady_tokens_per_s = res.steady_step_s > 0 ? f.seqs / res.steady_step_s : 0;

  int position = -1, pid = 0;
  const auto cluster = e.Cluster();
  for (size_t i = 0; i < cluster.ranks.size(); ++i)
    if (cluster.ranks[i].rank == f.kill_rank) position = static_cast<int>(i), pid = cluster.ranks[i].pid;
  if (pid <= 0 || position < 0) return Status::InvalidArgument(fmt::format("--kill-rank {}: no such rank process", f.kill_rank));
  const auto orphans = Orphans(e, position);
  EEP_ASSIGN_OR_RETURN(res.ceil, MeasureCeilings(e, f.model, backup_endpoint, orphans));
  EEP_RETURN_IF_ERROR(step().status());  // back to steady state after the ceilings

  // The kill, from another thread, while this one is inside Step.
  std::atomic<double> t_kill{0}, t_gone{0};
  const int pidfd = static_cast<int>(syscall(SYS_pidfd_open, pid, 0));
  const double t_call = eep::NowSeconds();
  std::thread killer([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(f.kill_delay_ms));
    t_kill.store(eep::NowSeconds());
    kill(pid, SIGKILL);
    // When the process is gone for its parent too: the kernel tears a big address space down
    // before the exit is visible, which bounds how fast anyone can detect it.
    struct pollfd p {pidfd, POLLIN, 0};
    if (pidfd >= 0 && poll(&p, 1, 10000) == 1) t_gone.store(eep::NowSeconds());
  });
  auto outs = e.Step(inputs);
  const double t_return = eep::NowSeconds();
  killer.join();
  if (pidfd >= 0) close(pidfd);
  if (t_gone.load() > 0) res.exit_s = t_gone.load() - t_kill.load();
  if (!outs.ok()) return outs.status();
  for (size_t i = 0; i < outs->size(); ++i) inputs[i].new_ids.assign(1, (*outs)[i].token);
  res.kill_into_step_s = t_kill.load() - t_call;
  res.mid_step = t_kill.load() < t_return;
  if (res.mid_step) {
    res.interruption_s = t_return - t_kill.load();
  } else {
    // The step finished first: the failure surfaces on the next step.
    const double t0 = eep::NowSeconds();
    EEP_RETURN_IF_ERROR(step().status());
    res.interruption_s = eep::NowSeconds() - t_kill.load();
    (void)t0;
  }
  std::vector<double> after;
  for (int s = 0; s < f.steps_after; ++s) {
    EEP_ASSIGN_OR_RETURN(double dt, step());
    after.push_back(dt);
  }
  res.after_step_s = Median(after);
  const auto final_cluster = e.Cluster();
  bool found = false;
  for (const auto& ev : final_cluster.events)
    if (ev.kind == "failover" && !ev.dead_ranks.empty()) res.ev = ev, found = true;
  e.Shutdown();
  if (!found) return Status::Internal("no failover event was recorded after the kill");
  return res;
}

std::string Times(double anchor_s, double ours_s) {
  return ours_s > 0 ? fmt::format("{:.1f}x", anchor_s / ours_s) : "-";
}

int RunBench(FailoverFlags f) {
  if (f.model.empty()) return eep::cli::Fail(Status::InvalidArgument("--model is required (see bench/failover.md)"));
  if (f.backup != "on" && f.backup != "off") return eep::cli::Fail(Status::InvalidArgument("--backup must be on or off"));
  if (f.kill_rank < 0 || f.kill_rank >= f.ep)
    return eep::cli::Fail(Status::InvalidArgument(fmt::format("--kill-rank {} is not a rank of --ep {}", f.kill_rank, f.ep)));
  if (f.kill_after_steps < 4) return eep::cli::Fail(Status::InvalidArgument("--kill-after-steps must be >= 4"));
  auto config = eep::LoadModelConfig(f.model);
  if (!config.ok()) return eep::cli::Fail(config.status());
  int64_t expert_bytes = 0, total_bytes = 0;
  {
    auto ckpt = eep::Checkpoint::Open(f.model);
    if (!ckpt.ok()) return eep::cli::Fail(ckpt.status());
    for (const auto& [name, t] : (*ckpt)->tensors()) {
      total_bytes += static_cast<int64_t>(t->nbytes);
      if (name.find(".experts.") != std::string::npos) expert_bytes += static_cast<int64_t>(t->nbytes);
    }
  }
  std::unique_ptr<eep::backup::BackupSidecar> sidecar;
  double sidecar_s = 0;
  if (f.backup == "on") {
    const double t0 = eep::NowSeconds();
    auto s = eep::backup::BackupSidecar::Start("/proc/self/exe", f.model, 0, 1, "shm", {"--log-level", "warn"}, 300000);
    if (!s.ok()) return eep::cli::Fail(s.status().WithContext("bench failover: backup manager"));
    sidecar = std::move(*s);
    sidecar_s = eep::NowSeconds() - t0;
  }
  std::vector<RunResult> runs;
  for (int r = 0; r < f.repeat; ++r) {
    auto run = RunOnce(f, sidecar ? sidecar->endpoint() : "");
    if (!run.ok()) return eep::cli::Fail(run.status().WithContext(fmt::format("bench failover run {}", r + 1)));
    runs.push_back(*run);
  }
  sidecar.reset();

  auto med = [&](auto get) {
    std::vector<double> v;
    for (const auto& r : runs) v.push_back(get(r));
    return Median(v);
  };
  const double interruption = med([](const RunResult& r) { return r.interruption_s; });
  nlohmann::json out;
  out["model"] = f.model;
  out["expert_bytes"] = expert_bytes;
  out["checkpoint_bytes"] = total_bytes;
  out["ep"] = f.ep;
  out["communicator"] = f.communicator;
  out["backend"] = f.backend;
  out["seqs"] = f.seqs;
  out["kill_rank"] = f.kill_rank;
  out["backup"] = f.backup;
  out["backup_manager_start_s"] = sidecar_s;
  out["runs"] = nlohmann::json::array();
  for (const auto& r : runs) {
    const auto& ev = r.ev;
    const int64_t bytes = ev.bytes_from_peers + ev.bytes_from_backup + ev.bytes_from_disk;
    out["runs"].push_back({{"engine_start_s", r.start_s},
                           {"steady_step_s", r.steady_step_s},
                           {"steady_tokens_per_s", r.steady_tokens_per_s},
                           {"after_step_s", r.after_step_s},
                           {"kill_into_step_s", r.kill_into_step_s},
                           {"mid_step", r.mid_step},
                           {"interruption_s", r.interruption_s},
                           {"kill_to_exit_visible_s", r.exit_s},
                           {"detect_s", ev.detect_seconds},
                           {"abort_s", ev.abort_seconds},
                           {"plan_s", ev.plan_seconds},
                           {"restore_s", ev.restore_seconds},
                           {"blocking_s", ev.blocking_seconds},
                           {"resume_s", ev.resume_seconds},
                           {"attempts", ev.attempts},
                           {"dead_ranks", ev.dead_ranks},
                           {"members", ev.members},
                           {"requeued_seqs", ev.requeued_seqs},
                           {"experts_from_backup", ev.experts_from_backup},
                           {"experts_from_peers", ev.experts_from_peers},
                           {"experts_from_disk", ev.experts_from_disk},
                           {"bytes_from_backup", ev.bytes_from_backup},
                           {"bytes_from_peers", ev.bytes_from_peers},
                           {"bytes_from_disk", ev.bytes_from_disk},
                           {"restore_gbps", ev.restore_seconds > 0 ? bytes / ev.restore_seconds / 1e9 : 0.0},
                           {"ceiling",
                            {{"bytes", r.ceil.bytes},
                             {"streaming_copy_gbps", r.ceil.copy_gbps},
                             {"memcpy_gbps", r.ceil.memcpy_gbps},
                             {"backup_fetch_gbps", r.ceil.fetch_gbps},
                             {"backup_fetch_convert_gbps", r.ceil.fetch_convert_gbps},
                             {"ring_gbps", r.ceil.ring_gbps},
                             {"disk_warm_read_f32_gbps", r.ceil.disk_gbps}}}});
  }
  out["median"] = {{"interruption_s", interruption},
                   {"steady_step_s", med([](const RunResult& r) { return r.steady_step_s; })},
                   {"vs_sglang_mooncake_low", interruption > 0 ? kSglangMooncakeLowS / interruption : 0.0},
                   {"vs_sglang_mooncake_high", interruption > 0 ? kSglangMooncakeHighS / interruption : 0.0},
                   {"vs_heartbeat_30s", interruption > 0 ? kHeartbeatTimeoutS / interruption : 0.0}};
  if (f.json) {
    fmt::print("{}\n", out.dump(2));
    return 0;
  }

  fmt::print("eep bench failover: {} ({:.2f} GiB, experts {:.2f} GiB: {} MoE layers x {} experts, hidden {}, expert {}, top-{})\n",
             f.model, total_bytes / double(1 << 30), expert_bytes / double(1 << 30), config->MoeLayers().size(),
             config->num_experts, config->hidden_size, config->ExpertIntermediate(), config->num_experts_per_tok);
  fmt::print("{} {} ranks ({}), {} greedy sequences decoding, rank {} SIGKILLed {} ms into step {}; DRAM backup {}{}\n",
             f.ep, f.backend == "cuda" ? "CUDA" : "CPU", f.communicator, f.seqs, f.kill_rank, f.kill_delay_ms, f.kill_after_steps + 1, f.backup,
             sidecar_s > 0 ? fmt::format(" (manager started in {:.1f} s)", sidecar_s) : "");
  fmt::print("{:<44}", "");
  for (size_t i = 0; i < runs.size(); ++i) fmt::print("{:>12}", fmt::format("run {}", i + 1));
  fmt::print("\n");
  auto row = [&](const std::string& name, auto get, const char* fmtstr) {
    fmt::print("{:<44}", name);
    for (const auto& r : runs) fmt::print("{:>12}", fmt::format(fmt::runtime(fmtstr), get(r)));
    fmt::print("\n");
  };
  row("engine start (s)", [](const RunResult& r) { return r.start_s; }, "{:.2f}");
  row("steady step, 4 ranks (ms)", [](const RunResult& r) { return r.steady_step_s * 1e3; }, "{:.1f}");
  row("steady decode (tokens/s)", [](const RunResult& r) { return r.steady_tokens_per_s; }, "{:.0f}");
  row("kill landed mid-step (ms into the Step call)",
      [](const RunResult& r) { return r.mid_step ? r.kill_into_step_s * 1e3 : -1.0; }, "{:.1f}");
  row("INTERRUPTION kill -> next token (ms)", [](const RunResult& r) { return r.interruption_s * 1e3; }, "{:.1f}");
  row("  detect: step start -> confirmed (ms)", [](const RunResult& r) { return r.ev.detect_seconds * 1e3; }, "{:.1f}");
  row("    of which kill -> confirmed, approx (ms)",
      [](const RunResult& r) { return (r.ev.detect_seconds - r.kill_into_step_s) * 1e3; }, "{:.1f}");
  row("    kill -> process exit visible (pidfd) (ms)", [](const RunResult& r) { return r.exit_s * 1e3; }, "{:.1f}");
  row("  abort: stop, roll back, holdings (ms)", [](const RunResult& r) { return r.ev.abort_seconds * 1e3; }, "{:.1f}");
  row("  plan (ms)", [](const RunResult& r) { return r.ev.plan_seconds * 1e3; }, "{:.1f}");
  row("  restore: comm + experts + switch (ms)", [](const RunResult& r) { return r.ev.restore_seconds * 1e3; }, "{:.1f}");
  row("  blocking window (ms)", [](const RunResult& r) { return r.ev.blocking_seconds * 1e3; }, "{:.1f}");
  row("  resume: switch -> step done (ms)", [](const RunResult& r) { return r.ev.resume_seconds * 1e3; }, "{:.1f}");
  row("sequences resumed elsewhere", [](const RunResult& r) { return r.ev.requeued_seqs; }, "{}");
  row("experts from backup / peers / disk",
      [](const RunResult& r) {
        return fmt::format("{}/{}/{}", r.ev.experts_from_backup, r.ev.experts_from_peers, r.ev.experts_from_disk);
      },
      "{}");
  row("restored (MiB)",
      [](const RunResult& r) {
        return (r.ev.bytes_from_backup + r.ev.bytes_from_peers + r.ev.bytes_from_disk) / double(1 << 20);
      },
      "{:.1f}");
  auto restore_gbps = [](const RunResult& r) {
    const double b = static_cast<double>(r.ev.bytes_from_backup + r.ev.bytes_from_peers + r.ev.bytes_from_disk);
    return r.ev.restore_seconds > 0 ? b / r.ev.restore_seconds / 1e9 : 0.0;
  };
  row("restore rate, bytes / restore phase (GB/s)", restore_gbps, "{:.2f}");
  row("ceiling: streaming copy, same bytes (GB/s)", [](const RunResult& r) { return r.ceil.copy_gbps; }, "{:.2f}");
  row("ceiling: memcpy, same bytes (GB/s)", [](const RunResult& r) { return r.ceil.memcpy_gbps; }, "{:.2f}");
  if (f.backup == "on") {
    row("ceiling: backup client fetch (GB/s)", [](const RunResult& r) { return r.ceil.fetch_gbps; }, "{:.2f}");
    row("  fetch + BF16->F32 (GB/s)", [](const RunResult& r) { return r.ceil.fetch_convert_gbps; }, "{:.2f}");
  }
  row(fmt::format("ceiling: {} BenchRing (GB/s)", f.communicator), [](const RunResult& r) { return r.ceil.ring_gbps; },
      "{:.2f}");
  row("ceiling: checkpoint ReadF32, warm (GB/s)", [](const RunResult& r) { return r.ceil.disk_gbps; }, "{:.2f}");
  // The ceiling of the source that served most bytes.
  row("restore / ceiling of its source",
      [&](const RunResult& r) {
        const auto& ev = r.ev;
        double c = r.ceil.disk_gbps;
        std::string src = "disk";
        if (ev.bytes_from_backup >= ev.bytes_from_peers && ev.bytes_from_backup >= ev.bytes_from_disk) c = r.ceil.copy_gbps, src = "copy";
        else if (ev.bytes_from_peers >= ev.bytes_from_disk) c = r.ceil.ring_gbps, src = "ring";
        return fmt::format("{:.0f}% {}", c > 0 ? 100 * restore_gbps(r) / c : 0.0, src);
      },
      "{}");
  row("step after, survivors (ms)", [](const RunResult& r) { return r.after_step_s * 1e3; }, "{:.1f}");
  fmt::print("\nmedian interruption {:.3f} s = {:.1f} steady steps\n", interruption,
             interruption / std::max(1e-9, med([](const RunResult& r) { return r.steady_step_s; })));
  fmt::print("  vs SGLang + Mooncake ({:.1f}-{:.1f} s per failure): {}-{} shorter\n", kSglangMooncakeLowS,
             kSglangMooncakeHighS, Times(kSglangMooncakeLowS, interruption), Times(kSglangMooncakeHighS, interruption));
  fmt::print("  vs a fixed {:.0f} s heartbeat timeout (detection alone): {} shorter\n", kHeartbeatTimeoutS,
             Times(kHeartbeatTimeoutS, interruption));
  return 0;
}

}  // namespace

EEP_REGISTER_BENCH(failover, "failover",
                   "a rank SIGKILLed mid-step: interruption to the next token, phases, restore rate vs its ceiling",
                   [](CLI::App* app) -> std::function<int()> {
                     auto f = std::make_shared<FailoverFlags>();
                     app->add_option("--model", f->model, "make-model checkpoint (see bench/failover.md)")->required();
                     app->add_option("--ep", f->ep, "rank processes")->check(CLI::Range(2, 64));
                     app->add_option("--communicator", f->communicator, "shm | ucx | nccl (one GPU per rank)");
                     app->add_option("--backend", f->backend, "where every rank computes: cpu | cuda")
                         ->check(CLI::IsMember({"cpu", "cuda"}));
                     app->add_option("--seqs", f->seqs, "sequences decoding in every step")->check(CLI::Range(1, 4096));
                     app->add_option("--kill-rank", f->kill_rank, "rank whose process is SIGKILLed");
                     app->add_option("--kill-after-steps", f->kill_after_steps,
                                     "steps before the one the kill lands in (prefill + decode)");
                     app->add_option("--kill-delay-ms", f->kill_delay_ms, "how far into that Step call the kill lands")
                         ->check(CLI::Range(0, 60000));
                     app->add_option("--backup", f->backup, "on: a DRAM backup manager sidecar serves the restore; off: peers/disk");
                     app->add_option("--repeat", f->repeat, "runs (a fresh engine each)")->check(CLI::Range(1, 100));
                     app->add_option("--steps-after", f->steps_after, "decode steps after the recovery")->check(CLI::Range(1, 1000));
                     app->add_flag("--json", f->json, "print JSON instead of the table");
                     app->add_option("--rank-log-level", f->rank_log_level, "log level of the rank processes");
                     return [f] { return RunBench(*f); };
                   });
