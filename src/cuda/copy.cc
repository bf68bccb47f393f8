// CopyBatch: many host/device copies queued on one stream and waited for once. Pageable host
// memory cannot be DMA'd: cudaMemcpy stages it through the driver's small buffers and runs at a
// fraction of the link's speed (and, with several processes on one GPU, pays a context switch
// per call). Here each pageable chunk goes through one of two pinned bounce buffers, the CPU
// copy of one chunk overlapping the DMA of the other.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <mutex>
#include <utility>
#include <vector>

#include "cuda/cuda_model.h"
#include "cuda/cuda_util.h"

namespace eep::cuda {
namespace {

constexpr uint64_t kBounceBytes = 16ull << 20;  // per buffer: large enough to run the link at speed

// What CUDA knows of an address (plain host memory: cudaMemoryTypeUnregistered).
cudaPointerAttributes Attributes(const void* p) {
  cudaPointerAttributes a{};
  if (cudaPointerGetAttributes(&a, p) != cudaSuccess) {
    cudaGetLastError();  // plain host memory on old drivers: not sticky
    a.type = cudaMemoryTypeUnregistered;
  }
  return a;
}

bool OnDevice(const cudaPointerAttributes& a) {
  return a.type == cudaMemoryTypeDevice || a.type == cudaMemoryTypeManaged;
}

class Copier {
 public:
  Status Prepare(int device) {
    std::lock_guard<std::mutex> lock(mu_);
    EEP_CUDA_RETURN_IF_ERROR(cudaSetDevice(device));
    return Init();
  }

  Status Run(std::span<const CopyItem> items) {
    if (std::all_of(items.begin(), items.end(), [](const CopyItem& it) { return it.bytes == 0; })) return Status::Ok();
    std::lock_guard<std::mutex> lock(mu_);
    // One attribute query per address; the GPU of the device memory involved (a rank's,
    // whichever thread calls) is current before the copier's stream and buffers are made.
    std::vector<std::pair<cudaPointerAttributes, cudaPointerAttributes>> attrs(items.size());
    bool device_set = false;
    for (size_t i = 0; i < items.size(); ++i) {
      if (items[i].bytes == 0) continue;
      auto& [da, sa] = attrs[i];
      da = Attributes(items[i].dst), sa = Attributes(items[i].src);
      if (const cudaPointerAttributes& dev = OnDevice(da) ? da : sa; !device_set && dev.type == cudaMemoryTypeDevice) {
        EEP_CUDA_RETURN_IF_ERROR(cudaSetDevice(dev.device));
        device_set = true;
      }
    }
    EEP_RETURN_IF_ERROR(Init());
    for (size_t i = 0; i < items.size(); ++i) {
      const CopyItem& it = items[i];
      if (it.bytes == 0) continue;
      const auto& [da, sa] = attrs[i];
      const bool dst_dev = OnDevice(da), src_dev = OnDevice(sa);
      const bool pinned_host = (dst_dev ? sa : da).type == cudaMemoryTypeHost;
      if (dst_dev == src_dev || pinned_host) {
        // Device to device, host to host, or pinned host: one DMA.
        EEP_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(it.dst, it.src, it.bytes, cudaMemcpyDefault, stream_));
      } else if (src_dev) {
        EEP_RETURN_IF_ERROR(DeviceToPageable(static_cast<uint8_t*>(it.dst), static_cast<const uint8_t*>(it.src), it.bytes));
      } else {
        EEP_RETURN_IF_ERROR(PageableToDevice(static_cast<uint8_t*>(it.dst), static_cast<const uint8_t*>(it.src), it.bytes));
      }
    }
    EEP_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
    return Status::Ok();
  }

 private:
  Status Init() {
    if (stream_ != nullptr) return Status::Ok();
    EEP_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    for (int i = 0; i < 2; ++i) {
      EEP_CUDA_RETURN_IF_ERROR(cudaHostAlloc(&bounce_[i], kBounceBytes, cudaHostAllocPortable));
      EEP_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&done_[i], cudaEventDisableTiming));
      EEP_CUDA_RETURN_IF_ERROR(cudaEventRecord(done_[i], stream_));
    }
    return Status::Ok();
  }

  // Chunk k: DMA into bounce k%2, then (once it landed) the CPU copies it out while chunk k+1's
  // DMA runs.
  Status DeviceToPageable(uint8_t* dst, const uint8_t* src, uint64_t n) {
    uint64_t pending_off = 0, pending_len = 0;
    int pending_buf = -1;
    for (uint64_t off = 0, k = 0; off < n || pending_buf >= 0; ++k) {
      int issued = -1;
      uint64_t len = 0;
      if (off < n) {
        issued = static_cast<int>(k % 2);
        len = std::min(kBounceBytes, n - off);
        EEP_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(done_[issued]));  // its last chunk was copied out
        EEP_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(bounce_[issued], src + off, len, cudaMemcpyDeviceToHost, stream_));
        EEP_CUDA_RETURN_IF_ERROR(cudaEventRecord(done_[issued], stream_));
      }
      if (pending_buf >= 0) {
        EEP_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(done_[pending_buf]));
        std::memcpy(dst + pending_off, bounce_[pending_buf], pending_len);
      }
      pending_buf = issued, pending_off = off, pending_len = len;
      off += len;
    }
    return Status::Ok();
  }

  // Chunk k: the CPU fills bounce k%2 (once its previous DMA is done), then its DMA is queued.
  Status PageableToDevice(uint8_t* dst, const uint8_t* src, uint64_t n) {
    for (uint64_t off = 0, k = 0; off < n; ++k) {
      const int b = static_cast<int>(k % 2);
      const uint64_t len = std::min(kBounceBytes, n - off);
      EEP_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(done_[b]));
      std::memcpy(bounce_[b], src + off, len);
      EEP_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dst + off, bounce_[b], len, cudaMemcpyHostToDevice, stream_));
      EEP_CUDA_RETURN_IF_ERROR(cudaEventRecord(done_[b], stream_));
      off += len;
    }
    return Status::Ok();
  }

  std::mutex mu_;
  cudaStream_t stream_ = nullptr;
  void* bounce_[2] = {nullptr, nullptr};
  cudaEvent_t done_[2] = {nullptr, nullptr};
};

Copier& TheCopier() {
  static Copier* copier = new Copier();  // process lifetime (CUDA may be gone at exit)
  return *copier;
}

}  // namespace

Status CopyBatch(std::span<const CopyItem> items) { return TheCopier().Run(items); }
Status PrepareCopyBatch(int device) { return TheCopier().Prepare(device); }

}  // namespace eep::cuda
