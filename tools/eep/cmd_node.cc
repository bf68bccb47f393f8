// eep node: one per host of a multi-host cluster; starts the host's ranks and backup manager
// (src/ep/node.h).
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>


#include "command.h"
#include "core/logging.h"
#include "ep/node.h"

namespace {

std::atomic<bool> g_node_stop{false};  // set by SIGINT/SIGTERM

void OnNodeStop(int) { g_node_stop.store(true); }

std::string HostName() {
  char name[256] = {0};
  if (gethostname(name, sizeof name - 1) != 0) return "node";
  return name;
}

EEP_REGISTER_COMMAND(
    node, "node", "run this host's ranks and DRAM expert backup for a multi-host cluster (etcd)",
    [](CLI::App* app) -> std::function<int()> {
      auto o = std::make_shared<eep::ep::NodeAgentOptions>();
      auto backup = std::make_shared<std::string>("on");
      app->add_option("--coordinator", o->coordinator, "etcd://HOST:PORT[,HOST:PORT...]")->required();
      app->add_option("--cluster", o->cluster, "cluster name (keys under /eep/NAME/)")->default_val("default");
      app->add_option("--name", o->name, "unique node name (default: the host name)");
      app->add_option("--address", o->address, "this host's address as the other hosts reach it")->default_val("127.0.0.1");
      app->add_option("--ranks", o->capacity, "ranks this host may run")->default_val(1)->check(CLI::PositiveNumber);
      app->add_option("--gpus", o->gpus, "GPUs of this host, one rank each (e.g. 0,1,2,3); sets --ranks")->delimiter(',');
      app->add_option("--model", o->model_dir, "checkpoint directory (the same path on every host)")->required();
      app->add_option("--expert-backup", *backup, "start this host's DRAM backup manager: on | off")
          ->check(CLI::IsMember({"on", "off"}));
      app->add_option("--node-rank", o->node_rank, "this host's index K in [0, N) for the backup assignment")->default_val(0);
      app->add_option("--num-nodes", o->num_nodes, "hosts N sharing the backup")->default_val(1);
      app->add_option("--backup-replicas", o->backup_replicas, "DRAM copies of each expert across hosts")->default_val(1);
      app->add_option("--num-redundant-experts", o->num_redundant_experts,
                      "as given to the coordinator (the backup rule follows the slot layout)")
          ->default_val(0);
      app->add_option("--backup-placement", o->backup_placement, "anti-affinity (default) | stripe (src/backup/backup.h)")
          ->default_val("anti-affinity");
      app->add_option("--backup-transport", o->backup_transport, "transfer backend of the backup (ucx crosses hosts)")
          ->default_val("ucx");
      app->add_option("--lease-ttl", o->lease_ttl_s, "seconds of etcd lease: how long a dead host takes to be noticed")
          ->default_val(2)
          ->check(CLI::PositiveNumber);
      app->footer("Prints `node NAME ready ENDPOINT` on stdout once registered. SIGINT/SIGTERM stop its ranks and leave.");
      return [o, backup]() -> int {
        std::FILE* out = eep::cli::ReserveStdout();
        if (o->name.empty()) o->name = HostName();
        o->expert_backup = *backup == "on";
        auto spdlevel = spdlog::level::to_string_view(spdlog::get_level());
        o->log_level = std::string(spdlevel.data(), spdlevel.size());
        struct sigaction sa {};
        sa.sa_handler = OnNodeStop;
        sigemptyset(&sa.sa_mask);
        sigaction(SIGINT, &sa, nullptr);
        sigaction(SIGTERM, &sa, nullptr);
        eep::Status st = eep::ep::RunNodeAgent(*o, g_node_stop, [out](const eep::ep::NodeRecord& r) {
          std::fprintf(out, "node %s ready %s\n", r.name.c_str(), r.endpoint.c_str());
          std::fflush(out);
        });
        return st.ok() ? 0 : eep::cli::Fail(st.WithContext("node"));
      };
    });

}  // namespace
