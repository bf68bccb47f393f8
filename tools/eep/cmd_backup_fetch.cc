// eep backup-fetch: fetch experts of one layer from backup managers into a safetensors file.
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <unistd.h>

#include <cstdio>
#include <sstream>

#include "backup/backup.h"
#include "command.h"
#include "core/util.h"
#include "model/safetensors.h"

namespace {

std::vector<std::string> SplitComma(const std::string& text) {
  std::vector<std::string> out;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ','))
    if (!item.empty()) out.push_back(item);
  return out;
}

struct FetchFlags {
  std::string managers;
  int64_t layer = 0;
  std::string experts;
  std::string out;
  std::string filter;
  std::string fingerprint;
  int64_t timeout_ms = 10000;
};

int RunFetch(const FetchFlags& f) {
  std::FILE* out = eep::cli::ReserveStdout();
  eep::backup::BackupClientOptions options;
  options.endpoints = SplitComma(f.managers);
  options.expected_fingerprint = f.fingerprint;
  options.timeout_ms = f.timeout_ms;
  if (options.endpoints.empty())
    return eep::cli::Fail(eep::Status::InvalidArgument("--manager: no endpoint given"));
  auto experts = eep::ParseIdList(f.experts, "--experts");
  if (!experts.ok()) return eep::cli::Fail(experts.status());

  double start_s = eep::NowSeconds();
  eep::backup::ExpertBackupClient client(options);
  eep::Status connected = client.Connect();
  if (connected.code() == eep::StatusCode::kInvalidArgument || client.NumReadyManagers() == 0)
    return eep::cli::Fail(connected.WithContext("backup-fetch"));
  auto params = client.ListExpertParams(f.layer, *experts, f.filter);
  if (!params.ok()) return eep::cli::Fail(params.status().WithContext("backup-fetch"));

  std::vector<std::vector<uint8_t>> buffers;
  eep::backup::FetchDestinations destinations;
  std::vector<eep::TensorToWrite> tensors;
  uint64_t total_bytes = 0;
  std::vector<std::string> managers;
  buffers.reserve(params->size());
  for (const auto& p : *params) {
    buffers.emplace_back(p.num_bytes);
    destinations[p.name] = {buffers.back().data(), p.num_bytes, eep::transfer::MemoryKind::kHost};
    tensors.push_back({p.name, p.dtype, p.shape, buffers.back().data()});
    total_bytes += p.num_bytes;
    if (std::find(managers.begin(), managers.end(), p.manager) == managers.end())
      managers.push_back(p.manager);
  }
  eep::Status fetched = client.FetchLogicalExperts(f.layer, *experts, f.filter, destinations);
  if (!fetched.ok()) return eep::cli::Fail(fetched.WithContext("backup-fetch"));
  double elapsed_s = eep::NowSeconds() - start_s;

  std::map<std::string, std::string> metadata = {{"layer", std::to_string(f.layer)},
                                                 {"experts", f.experts}};
  auto descriptors = client.Descriptors();
  if (!descriptors.empty()) metadata["fingerprint"] = descriptors.front().fingerprint;
  if (eep::Status s = eep::WriteSafetensors(f.out, tensors, metadata); !s.ok())
    return eep::cli::Fail(s.WithContext("--out"));
  std::fprintf(out,
               "fetched %zu tensors (%.1f MiB) of layer %lld experts %s from %zu managers in %.1f "
               "ms -> %s\n",
               tensors.size(), total_bytes / double(1 << 20), static_cast<long long>(f.layer),
               f.experts.c_str(), managers.size(), elapsed_s * 1e3, f.out.c_str());
  std::fflush(out);
  return 0;
}

}  // namespace

EEP_REGISTER_COMMAND(
    backup_fetch, "backup-fetch",
    "fetch experts of one layer from expert backup managers into a safetensors file",
    [](CLI::App* app) -> std::function<int()> {
      auto f = std::make_shared<FetchFlags>();
      app->add_option("--manager", f->managers, "backup manager endpoint(s), comma-separated")
          ->required();
      app->add_option("--layer", f->layer, "layer id")->required();
      app->add_option("--experts", f->experts, "logical expert ids, e.g. 3,17")->required();
      app->add_option("--out", f->out,
                      "output .safetensors file (tensors under their checkpoint names)")
          ->required();
      app->add_option("--filter", f->filter,
                      "regex on tensor names, e.g. 'gate_proj|up_proj' (default: all)");
      app->add_option("--fingerprint", f->fingerprint,
                      "expected checkpoint fingerprint (refuse others)");
      app->add_option("--timeout-ms", f->timeout_ms, "deadline of connect and of the fetch")
          ->default_val(10000);
      return [f]() { return RunFetch(*f); };
    });
