// "ucx" transfer backend (private to src/transfer; use it through transfer.h).
//
// UCX/UCP one-sided RMA. SupportsRemote() == true, SupportsDevice() == false (a CUDA-enabled UCX
// build would flip it: UCX itself handles cuda memory types).
// * One ucp_context (features RMA + WAKEUP) and one ucp_worker (UCS_THREAD_MODE_SERIALIZED) per
//   engine; the engine's mutex serialises every UCP call, so Engine methods are thread-safe.
//   Transports are UCX's choice (UCX_TLS and every UCX_* environment variable apply; the engine
//   param `tls` sets UCX_TLS only when the environment does not).
// * AllocateExportable: anonymous mmap (+ mlock for kPinnedHost) registered with ucp_mem_map.
//   RegisterMemory: ucp_mem_map of caller memory; transfers whose local buffer lies in a
//   registered region pass its memh (UCP_OP_ATTR_FIELD_MEMH).
// * Descriptor blob (UcxRegionBlob, little-endian): u32 length + the owner's worker address, then
//   u32 length + the packed rkey (ucp_rkey_pack). Import creates (or reuses, per worker address)
//   an endpoint with UCP_ERR_HANDLING_MODE_PEER and unpacks the rkey on it.
// * Transfers: items adjacent on both sides are merged; one ucp_get_nbx / ucp_put_nbx per
//   merged run (split at 64 MiB); completion callbacks count down; WRITE batches end with
//   ucp_ep_flush_nbx so OK means remotely complete. Poll progresses the worker; Wait polls for
//   up to 200 us, then sleeps on the worker's event fd (ucp_worker_get_efd + ucp_worker_arm). A peer failure fails the endpoint (kRemoteDisconnect for its requests and
//   regions until they are imported again); Cancel force-closes the endpoint so UCX completes
//   every outstanding operation before it returns.
// * Same host: UCX 1.13 with peer-failure handling does not put RMA on cma/shm lanes; GET is
//   emulated over tcp (loopback: 0.4-1 GB/s on the dev VM). Peer-failure handling is not
//   optional (without it a dead peer leaves operations that no cancel reclaims), so use "shm"
//   within a host.
// * Known UCX 1.13 defect: if a peer dies while the target's UCX still has a wire-up reply queued
//   for it, an assertion in the target's UCX aborts the target process (openucx/ucx#8175, fixed
//   upstream). Import completes the wire-up, so this window is the importer's connect only;
//   transfers never open it. Run targets under a supervisor that restarts them.
// * The target must progress its worker (over tcp UCX emulates GET with active messages): the
//   owner calls Engine::ProgressFor, or polls EventFd() and calls Progress().
#pragma once

#include <memory>
#include <string>
#include <string_view>

#include "transfer/transfer.h"

namespace eep::transfer {

Result<std::unique_ptr<Engine>> CreateUcxEngine(const EngineOptions& options);

// The content of RegionDescriptor::backend_blob for "ucx" regions. Exposed so a benchmark can
// drive raw UCP against an exported region (the transport's ceiling).
struct UcxRegionBlob {
  std::string worker_address;  // ucp_worker_get_address bytes
  std::string packed_rkey;     // ucp_rkey_pack bytes
};
std::string EncodeUcxBlob(const UcxRegionBlob& blob);
Result<UcxRegionBlob> DecodeUcxBlob(std::string_view bytes);

}  // namespace eep::transfer
