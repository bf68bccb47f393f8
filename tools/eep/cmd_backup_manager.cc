// eep backup-manager: the per-node expert backup sidecar (src/backup/backup.h).
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>

#include "backup/backup.h"
#include "command.h"
#include "core/logging.h"
#include "cuda/cuda_model.h"
#include "transfer/transfer.h"

namespace {

std::atomic<bool> g_stop{false};  // set by SIGINT/SIGTERM; lock-free, so safe in a handler
static_assert(std::atomic<bool>::is_always_lock_free);

void OnStopSignal(int) {
  g_stop.store(true);
}

void InstallStopHandlers() {
  struct sigaction sa {};
  sa.sa_handler = OnStopSignal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = 0;  // no SA_RESTART: a blocking poll returns EINTR and sees the flag at once
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);
}

}  // namespace

EEP_REGISTER_COMMAND(
    backup_manager, "backup-manager",
    "keep this node's share of the expert weights in host memory and serve one-sided reads of it",
    [](CLI::App* app) -> std::function<int()> {
      auto opts = std::make_shared<eep::backup::BackupManagerOptions>();
      app->add_option("--model", opts->model_dir,
                      "checkpoint directory (HF format: config.json + safetensors)")
          ->required();
      app->add_option("--node-rank", opts->node_rank, "this node's rank K in [0, N)")->required();
      app->add_option("--num-nodes", opts->num_nodes, "number of nodes N")->required();
      app->add_option("--listen", opts->listen_endpoint,
                      "ZeroMQ endpoint to serve the descriptor on; port 0 picks a free port")
          ->required();
      app->add_option(
             "--transport", opts->transport,
             fmt::format("transfer backend ({})", fmt::join(eep::transfer::BackendNames(), "|")))
          ->default_val("shm");
      app->add_option("--replicas", opts->replicas,
                      "each expert e is held by nodes (e+j) mod N, j < R")
          ->default_val(1);
      auto placement = std::make_shared<std::string>("stripe");
      app->add_option("--backup-placement", *placement,
                      "stripe: expert e on nodes (e+j) mod N; anti-affinity: on nodes other than "
                      "the one serving it (src/backup/backup.h)")
          ->default_val("stripe");
      app->add_option("--slots-per-node", opts->slots_per_node,
                      "anti-affinity: physical expert slots per node (default ceil(E/N))")
          ->check(CLI::NonNegativeNumber);
      app->add_flag("--pin-memory", opts->pin_memory,
                    "lock the backup region in RAM (needs ulimit -l) and, in a CUDA build with a "
                    "GPU, register it with CUDA (cudaHostRegister)");
      app->footer(
          "Prints `listening ENDPOINT` on stdout once the experts are loaded and served. "
          "SIGINT/SIGTERM stop it "
          "cleanly.");
      return [opts, placement]() -> int {
        auto parsed = eep::backup::ParseBackupPlacement(*placement);
        if (!parsed.ok()) return eep::cli::Fail(parsed.status().WithContext("backup-manager"));
        opts->placement = *parsed;
        std::FILE* out = eep::cli::ReserveStdout();
        InstallStopHandlers();
        opts->cancel = &g_stop;
        auto manager = eep::backup::ExpertBackupManager::Create(*opts);
        if (!manager.ok()) return eep::cli::Fail(manager.status().WithContext("backup-manager"));
        // --pin-memory: the transport locked the region (mlock); a CUDA build with a GPU also
        // registers it, so GPU copies out of it in this process run as DMA at full speed.
        std::unique_ptr<eep::cuda::HostRegistration> cuda_registration;
        if (opts->pin_memory) {
          const auto& region = (*manager)->descriptor().region;
          auto reg = eep::cuda::HostRegistration::Register(reinterpret_cast<void*>(region.base_address),
                                                           region.num_bytes);
          if (reg.ok()) {
            cuda_registration = std::move(*reg);
            EEP_LOG_INFO("backup: --pin-memory: region of {:.2f} GiB locked and registered with CUDA on {}",
                         region.num_bytes / double(1ull << 30), eep::cuda::DeviceDescription());
          } else {
            EEP_LOG_INFO("backup: --pin-memory: region locked in RAM (mlock) only, not registered with CUDA: {}",
                         reg.status().message());
          }
        }
        std::fprintf(out, "listening %s\n", (*manager)->endpoint().c_str());
        std::fflush(out);
        eep::Status s = (*manager)->Serve(g_stop);
        cuda_registration.reset();  // before the region goes
        manager->reset();           // closes the socket, releases the region
        return s.ok() ? 0 : eep::cli::Fail(s);
      };
    });
