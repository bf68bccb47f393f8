// The nccl communicator when eep is built without CUDA/NCCL: the name is known and says why
// it cannot be used.
#include "ep/communicator.h"
#include "ep/internal.h"

namespace eep::ep {

void RegisterNcclCommunicator() {
  RegisterCommunicator("nccl", [](const CommunicatorOptions&, Bootstrap*) -> Result<std::unique_ptr<Communicator>> {
    return Status::Unavailable("--ep-communicator nccl: eep was built without CUDA/NCCL (EEP_ENABLE_CUDA=OFF)");
  });
}

}  // namespace eep::ep
