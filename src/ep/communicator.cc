#include "ep/communicator.h"

#include <map>
#include <mutex>

#include "ep/internal.h"

namespace eep::ep {

namespace {
std::mutex& RegistryMutex() {
  static std::mutex mu;
  return mu;
}
std::map<std::string, CommunicatorFactory>& Registry() {
  static std::map<std::string, CommunicatorFactory> r;
  return r;
}
// Built-in backends, one line each (explicit calls: static-library registration objects
// would be dropped by the linker).
void RegisterBuiltins() {
  static std::once_flag once;
  std::call_once(once, [] {
    RegisterShmCommunicator();
    RegisterUcxCommunicator();
    RegisterNcclCommunicator();
  });
}
}  // namespace

bool RegisterCommunicator(const std::string& name, CommunicatorFactory factory) {
  std::lock_guard<std::mutex> lock(RegistryMutex());
  Registry()[name] = std::move(factory);
  return true;
}

std::vector<std::string> CommunicatorNames() {
  RegisterBuiltins();
  std::lock_guard<std::mutex> lock(RegistryMutex());
  std::vector<std::string> names;
  for (const auto& [n, f] : Registry()) names.push_back(n);
  return names;
}

Result<std::unique_ptr<Communicator>> CreateCommunicator(const std::string& name,
                                                         const CommunicatorOptions& options,
                                                         Bootstrap* bootstrap) {
  RegisterBuiltins();
  CommunicatorFactory factory;
  {
    std::lock_guard<std::mutex> lock(RegistryMutex());
    auto it = Registry().find(name);
    if (it != Registry().end()) factory = it->second;
  }
  if (!factory) {
    std::string known;
    for (const auto& n : CommunicatorNames()) known += (known.empty() ? "" : ", ") + n;
    return Status::InvalidArgument("--ep-communicator: unknown communicator '" + name + "' (known: " + known + ")");
  }
  return factory(options, bootstrap);
}

}  // namespace eep::ep
