// The expert-parallel flags shared by generate, logits and serve.
#pragma once

#include <CLI/CLI.hpp>


#include "core/logging.h"
#include "ep/ep.h"

namespace eep::cli {

struct EpFlags {
  int ep = 0;  // 0: in-process runtime; N >= 1: N rank processes
  ep::EpOptions options;
};

inline void AddEpFlags(CLI::App* app, EpFlags* f) {
  app->add_option("--ep", f->ep, "expert-parallel ranks (processes); 0 = in-process")->check(CLI::NonNegativeNumber);
  app->add_option("--num-redundant-experts", f->options.num_redundant_experts, "extra physical expert slots per MoE layer")
      ->check(CLI::NonNegativeNumber);
  app->add_option("--ep-communicator", f->options.communicator, "data-plane communicator: shm | ucx | nccl (CUDA builds, one rank per GPU)");
  app->add_option("--eplb-interval", f->options.eplb_interval, "steps between EPLB rebalances (0 = off)")
      ->check(CLI::NonNegativeNumber);
  app->add_option("--eplb-policy", f->options.eplb_policy, "min-move | deepseek")
      ->check(CLI::IsMember({"min-move", "deepseek"}));
  app->add_option("--peer-timeout-ms", f->options.peer_timeout_ms, "deadline of data-plane exchanges between ranks")
      ->check(CLI::PositiveNumber);
  app->add_option("--heartbeat-interval-ms", f->options.heartbeat_interval_ms, "rank heartbeats to the coordinator")
      ->check(CLI::PositiveNumber);
  app->add_option("--expert-slot-headroom", f->options.expert_slot_headroom,
                  "spare expert slots per rank for a dead rank's experts (-1 = allocate on demand)")
      ->check(CLI::Range(int64_t{-1}, int64_t{1} << 30));
  app->add_flag("--eplb-async", f->options.eplb_async, "EPLB exchange in the background; only the switch blocks");
  app->add_option("--expert-backup-endpoints", f->options.backup_endpoints,
                  "DRAM backup managers (eep backup-manager endpoints), comma-separated")
      ->delimiter(',');
  app->add_option("--eplb-source", f->options.eplb_source, "where moved experts come from: peers | backup")
      ->check(CLI::IsMember({"peers", "backup"}));
  app->add_option("--inject-fault", f->options.inject_fault, "fault injection: rank=R,after-steps=N,mode=kill|hang|slow[,at=step|eplb]");
}

// Options for EpEngine::Start, with the process's log level passed on to the ranks and the
// command's --backend (cpu | cuda: where every rank computes).
inline ep::EpOptions EpOptionsFor(const EpFlags& f, const std::string& backend = "cpu") {
  ep::EpOptions o = f.options;
  o.ep_size = f.ep;
  o.backend = backend;
  auto level = spdlog::level::to_string_view(spdlog::get_level());
  o.log_level = std::string(level.data(), level.size());
  return o;
}

}  // namespace eep::cli
