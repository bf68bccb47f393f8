// Private to src/ep: registration hooks of the built-in communicators.
#pragma once

namespace eep::ep {
void RegisterShmCommunicator();
void RegisterUcxCommunicator();
void RegisterNcclCommunicator();  // nccl/: the real one with CUDA, else a stub saying why not
}  // namespace eep::ep
