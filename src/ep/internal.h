// Private to src/ep: registration hooks of the built-in communicators.
#pragma once

namespace eep::ep {
void RegisterShmCommunicator();
void RegisterUcxCommunicator();
}  // namespace eep::ep
