// Benchmarks' scratch memory: page-aligned anonymous memory, pre-faulted (transparent huge pages
// asked for), so that measured copies do not pay for first-touch page faults.
#pragma once

#include <sys/mman.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace eep::cli {

struct BenchBuffer {
  uint8_t* data = nullptr;  // null if the mapping failed
  size_t num_bytes = 0;
  explicit BenchBuffer(size_t n) : num_bytes(std::max<size_t>(n, 1)) {
    void* p = mmap(nullptr, num_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return;
    madvise(p, num_bytes, MADV_HUGEPAGE);
    std::memset(p, 1, num_bytes);
    data = static_cast<uint8_t*>(p);
  }
  ~BenchBuffer() {
    if (data) munmap(data, num_bytes);
  }
  BenchBuffer(const BenchBuffer&) = delete;
  BenchBuffer& operator=(const BenchBuffer&) = delete;
};

}  // namespace eep::cli
