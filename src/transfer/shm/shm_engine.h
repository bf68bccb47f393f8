// "shm" transfer backend (private to src/transfer; use it through transfer.h).
//
// Same host only (SupportsRemote() == false, SupportsDevice() == false).
// * AllocateExportable: memfd_create("eep-<token>") + ftruncate + mmap(MAP_SHARED). No name in
//   /dev/shm, so nothing leaks when the owner is SIGKILLed: the memory goes away with the last
//   fd or mapping. kPinnedHost additionally mlock()s the pages.
// * Descriptor blob: JSON {"pid": owner pid, "fd": memfd number, "token": random hex}. The reader
//   opens /proc/<pid>/fd/<fd> (same user needed), checks that the link target names the token
//   (guards against pid/fd reuse), and maps it (MAP_POPULATE unless populate=0, so the page
//   faults are paid at Import, not on the restore path).
// * Transfers are copies (StreamingCopy, copy.h) between the caller's buffer and the mapping, done
// by Poll() in slices of
//   `slice_bytes` so a Deadline is checked between slices. EventFd() is -1.
// * Liveness: the reader holds a pidfd of the owner; Poll and CheckAlive() report
//   kRemoteDisconnect once the owner exited, even though the mapping would still be readable —
//   a region is only valid while its owner lives (same contract as ucx).
//
// Engine params: slice_bytes (default 67108864), populate (1|0, default 1).
#pragma once

#include <memory>

#include "transfer/transfer.h"

namespace eep::transfer {

Result<std::unique_ptr<Engine>> CreateShmEngine(const EngineOptions& options);

}  // namespace eep::transfer
