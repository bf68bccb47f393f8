// Bulk host memory copy used by the same-host data paths (shm backend; benchmarks' ceilings).
#pragma once

#include <cstddef>

namespace eep::transfer {

// Copies `num_bytes` from `src` to `dst` (non-overlapping). Copies of at least
// kStreamingCopyMinBytes use non-temporal stores on x86-64: they skip the read-for-ownership of
// the destination and leave the cache alone, which is what a restore of gigabytes of weights
// wants (about 2x glibc memcpy for GiB-sized copies on the dev VM); shorter copies, and other
// architectures, use memcpy. The stores are fenced: the bytes are visible to other threads
// when it returns.
void StreamingCopy(void* dst, const void* src, size_t num_bytes);

inline constexpr size_t kStreamingCopyMinBytes = 256 * 1024;

}  // namespace eep::transfer
