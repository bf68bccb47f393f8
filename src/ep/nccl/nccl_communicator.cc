// nccl communicator: one rank per GPU, NCCL point-to-point between the GPUs.
//
// AllToAllV moves host spans: the sizes go first (one int64 per peer, grouped send/recv),
// then every rank copies its outgoing bytes into one device buffer
// `// [to rank 0][to rank 1]...`, one grouped ncclSend/ncclRecv round moves them into a
// device buffer `// [from rank 0][from rank 1]...`, and the received bytes are copied back
// to the host. Self-traffic goes through NCCL too (one code path; world size 1 tests it).
//
// Fault tolerance: the communicator is non-blocking (ncclConfig_t.blocking = 0), so no NCCL
// call blocks (a group may still be being enqueued when ncclGroupEnd returns ncclInProgress:
// stream work that depends on it is queued only once the communicator is idle); every wait polls the stream and ncclCommGetAsyncError against the peer
// deadline and the abort flag. NCCL cannot say which peer is missing: a timeout reports all
// other ranks as silent (the coordinator confirms which one is dead). Abort() makes the
// exchanging thread call ncclCommAbort, which ends the operations in flight; with
// EEP_NCCL_SHRINK=1 the communicator is kept instead, and the survivors' next one is made
// from it by ncclCommShrink (NCCL_SHRINK_ABORT ends what was in flight).
//
// ExchangeDevice moves GPU memory rank to rank (EPLB weight exchange from expert slots into a
// peer's device staging) in one grouped ncclSend/ncclRecv round, with the same waits.
// One rank per GPU: NCCL refuses two ranks of one communicator on one device.
#include <cuda_runtime.h>
#include <nccl.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <fmt/format.h>
#include <thread>

#include "core/logging.h"
#include "core/util.h"
#include "ep/communicator.h"
#include "ep/internal.h"

namespace eep::ep {
namespace {

std::string Hex(const void* data, size_t n) {
  static const char* kDigits = "0123456789abcdef";
  std::string s(2 * n, '0');
  const auto* p = static_cast<const uint8_t*>(data);
  for (size_t i = 0; i < n; ++i) {
    s[2 * i] = kDigits[p[i] >> 4];
    s[2 * i + 1] = kDigits[p[i] & 15];
  }
  return s;
}

bool Unhex(const std::string& s, void* out, size_t n) {
  if (s.size() != 2 * n) return false;
  auto digit = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
  };
  auto* p = static_cast<uint8_t*>(out);
  for (size_t i = 0; i < n; ++i) {
    const int hi = digit(s[2 * i]), lo = digit(s[2 * i + 1]);
    if (hi < 0 || lo < 0) return false;
    p[i] = static_cast<uint8_t>(hi << 4 | lo);
  }
  return true;
}

#define EEP_NCCL_CUDA_RETURN_IF_ERROR(expr)                                                         \
  do {                                                                                              \
    cudaError_t eep_err_ = (expr);                                                                  \
    if (eep_err_ != cudaSuccess)                                                                    \
      return Status::Internal(fmt::format("nccl: {} failed: {}", #expr, cudaGetErrorString(eep_err_))); \
  } while (0)

struct DeviceFree {
  void operator()(void* p) const { cudaFree(p); }
};
using DeviceBytes = std::unique_ptr<uint8_t, DeviceFree>;

class NcclCommunicator : public Communicator {
 public:
  ~NcclCommunicator() override {
    // Abort frees the communicator's resources without waiting for peers that may be gone.
    if (comm_ != nullptr) ncclCommAbort(comm_);
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }

  const char* name() const override { return "nccl"; }
  bool SupportsRemote() const override { return true; }   // NCCL's network transports
  bool SupportsDevice() const override { return true; }   // device staging; host spans today
  int rank() const override { return rank_; }
  int world_size() const override { return world_; }

  static Result<std::unique_ptr<Communicator>> Create(const CommunicatorOptions& o, Bootstrap* boot) {
    // NVLink SHARP (multicast) stays off on these machines (see shared/DEVICE.md).
    setenv("NCCL_NVLS_ENABLE", "0", 1);
    auto c = std::unique_ptr<NcclCommunicator>(new NcclCommunicator());
    c->rank_ = o.rank;
    c->world_ = o.world_size;
    c->timeout_ms_ = o.peer_timeout_ms;
    c->defer_abort_ = ShrinkEnabled();
    int devices = 0;
    const cudaError_t e = cudaGetDeviceCount(&devices);
    if (e != cudaSuccess || devices == 0)
      return Status::Unavailable(fmt::format("nccl: no CUDA device is visible ({})",
                                             e != cudaSuccess ? cudaGetErrorString(e) : "none"));
    c->device_ = o.device >= 0 ? o.device : o.rank % devices;
    EEP_NCCL_CUDA_RETURN_IF_ERROR(cudaSetDevice(c->device_));
    EEP_NCCL_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&c->stream_, cudaStreamNonBlocking));
    // Rank 0 makes the unique id; the bootstrap all-gather hands it to everyone (hex: the
    // control plane carries text).
    ncclUniqueId id{};
    std::string mine;
    if (o.rank == 0) {
      EEP_RETURN_IF_ERROR(c->Check(ncclGetUniqueId(&id), "ncclGetUniqueId"));
      mine = Hex(&id, sizeof id);
    }
    EEP_ASSIGN_OR_RETURN(auto all, boot->AllGather(mine));
    if (all.empty() || !Unhex(all[0], &id, sizeof id))
      return Status::Internal("nccl: bootstrap did not carry rank 0's unique id");
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    ncclComm_t comm = nullptr;
    ncclResult_t r = ncclCommInitRankConfig(&comm, o.world_size, id, o.rank, &config);
    c->comm_ = comm;
    if (r != ncclSuccess && r != ncclInProgress)
      return c->Check(r, "ncclCommInitRankConfig");
    // Initialisation connects to every peer: allow it longer than one exchange.
    constexpr int64_t kInitTimeoutMs = 120000;
    EEP_RETURN_IF_ERROR_CTX(c->WaitComm(std::max(kInitTimeoutMs, o.peer_timeout_ms), /*stream_too=*/false),
                            fmt::format("nccl: init of rank {} of {} on GPU {}", o.rank, o.world_size, c->device_));
    EEP_LOG_DEBUG("nccl: rank {} of {} on GPU {} ready", o.rank, o.world_size, c->device_);
    return std::unique_ptr<Communicator>(std::move(c));
  }

  void Abort() override { aborted_.store(true); }

  bool SupportsDeviceExchange() const override { return true; }

  // One grouped round of ncclSend/ncclRecv straight between the callers' device buffers (expert
  // slots → a peer's staging): no host copy, no staging on the sending side. NCCL matches the
  // sends and receives of each ordered pair in issue order, which is the contract.
  Status ExchangeDevice(std::span<const DeviceSpan> sends, std::span<const DeviceSpan> recvs) override {
    silent_peers_.clear();
    if (aborted_.load()) return AbortNow();
    if (comm_ == nullptr) return Status::Cancelled("nccl: communicator was aborted");
    for (const auto* list : {&sends, &recvs})
      for (const DeviceSpan& d : *list)
        if (d.peer < 0 || d.peer >= world_ || (d.data == nullptr && d.bytes > 0))
          return Status::InvalidArgument(
              fmt::format("ExchangeDevice: peer {} of {} ranks, {} bytes at {}", d.peer, world_, d.bytes, d.data));
    if (sends.empty() && recvs.empty()) return Status::Ok();
    EEP_NCCL_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
    return SendRecv(sends, recvs, "device exchange");
  }

  // ncclCommShrink(NCCL_SHRINK_ABORT): ends what is in flight on this communicator (a peer is
  // dead), then builds the survivors' communicator from this one's bootstrap state, so no new
  // unique id and no full re-initialisation. This communicator is torn down on a thread
  // afterwards (its ncclCommAbort takes ~0.5 s and nobody waits for it).
  Result<std::unique_ptr<Communicator>> Shrink(const std::vector<int>& excluded) override {
    if (comm_ == nullptr) return Status::Cancelled("nccl: shrink of a communicator already torn down");
    // NCCL wants at least one rank excluded (a shrink by nobody is no shrink).
    if (excluded.empty()) return Status::InvalidArgument("nccl: shrink excludes no rank");
    std::vector<int> ex(excluded);
    for (int p : ex)
      if (p < 0 || p >= world_ || p == rank_)
        return Status::InvalidArgument(fmt::format("nccl: shrink excludes rank {} (world {}, self {})", p, world_, rank_));
    std::sort(ex.begin(), ex.end());
    ex.erase(std::unique(ex.begin(), ex.end()), ex.end());
    EEP_NCCL_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
    auto c = std::unique_ptr<NcclCommunicator>(new NcclCommunicator());
    c->world_ = world_ - static_cast<int>(ex.size());
    c->rank_ = rank_ - static_cast<int>(std::lower_bound(ex.begin(), ex.end(), rank_) - ex.begin());
    c->device_ = device_;
    c->timeout_ms_ = timeout_ms_;
    c->defer_abort_ = defer_abort_;
    c->on_silence_ = on_silence_;
    EEP_NCCL_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&c->stream_, cudaStreamNonBlocking));
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    ncclComm_t child = nullptr;
    const ncclResult_t r =
        ncclCommShrink(comm_, ex.data(), static_cast<int>(ex.size()), &child, &config, NCCL_SHRINK_ABORT);
    c->comm_ = child;
    if (r != ncclSuccess && r != ncclInProgress) return c->Check(r, "ncclCommShrink");
    constexpr int64_t kShrinkTimeoutMs = 60000;
    EEP_RETURN_IF_ERROR_CTX(c->WaitComm(std::max(kShrinkTimeoutMs, timeout_ms_), /*stream_too=*/false),
                            fmt::format("nccl: shrink of rank {} of {} to {} ranks", rank_, world_, c->world_));
    // The parent is finished with: tear it down off the caller's path.
    ncclComm_t parent = comm_;
    comm_ = nullptr;
    aborted_.store(true);
    std::thread([parent, dev = device_] {
      cudaSetDevice(dev);
      ncclCommAbort(parent);
    }).detach();
    EEP_LOG_DEBUG("nccl: rank {} of {} shrunk to rank {} of {}", rank_, world_, c->rank_, c->world_);
    return std::unique_ptr<Communicator>(std::move(c));
  }

  Status AllToAllV(const std::vector<std::span<const uint8_t>>& send,
                   std::vector<std::vector<uint8_t>>* recv) override {
    if (static_cast<int>(send.size()) != world_)
      return Status::InvalidArgument(fmt::format("AllToAllV: {} send buffers for {} ranks", send.size(), world_));
    silent_peers_.clear();
    if (aborted_.load()) return AbortNow();
    if (comm_ == nullptr) return Status::Cancelled("nccl: communicator was aborted");
    EEP_NCCL_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
    const size_t W = static_cast<size_t>(world_);
    // 1. Sizes: send_sizes[p] → rank p, recv_sizes[p] ← rank p.
    std::vector<int64_t> send_sizes(W), recv_sizes(W, -1);
    for (size_t p = 0; p < W; ++p) send_sizes[p] = static_cast<int64_t>(send[p].size());
    EEP_RETURN_IF_ERROR(Reserve(&sizes_dev_, &sizes_bytes_, 2 * W * sizeof(int64_t)));
    auto* sizes_out = reinterpret_cast<int64_t*>(sizes_dev_.get());
    int64_t* sizes_in = sizes_out + W;
    EEP_NCCL_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(sizes_out, send_sizes.data(), W * sizeof(int64_t), cudaMemcpyHostToDevice, stream_));
    std::vector<DeviceSpan> out_spans, in_spans;
    for (int p = 0; p < world_; ++p) {
      out_spans.push_back({p, sizes_out + p, sizeof(int64_t)});
      in_spans.push_back({p, sizes_in + p, sizeof(int64_t)});
    }
    // (SendRecv waits, polling and abortable, for the transfers themselves before the copy
    // back: a copy to pageable host memory blocks the thread until earlier stream work is done,
    // which would hang forever on a dead peer instead of returning to the abort check.)
    EEP_RETURN_IF_ERROR(SendRecv(out_spans, in_spans, "size exchange"));
    EEP_NCCL_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(recv_sizes.data(), sizes_in, W * sizeof(int64_t), cudaMemcpyDeviceToHost, stream_));
    EEP_RETURN_IF_ERROR_CTX(WaitComm(timeout_ms_, /*stream_too=*/true), "nccl: size exchange");
    // 2. Stage the outgoing bytes on the device.
    std::vector<size_t> send_off(W + 1, 0), recv_off(W + 1, 0);
    for (size_t p = 0; p < W; ++p) {
      if (recv_sizes[p] < 0) return Status::Corruption(fmt::format("nccl: rank {} announced {} bytes", p, recv_sizes[p]));
      send_off[p + 1] = send_off[p] + send[p].size();
      recv_off[p + 1] = recv_off[p] + static_cast<size_t>(recv_sizes[p]);
    }
    EEP_RETURN_IF_ERROR(Reserve(&send_dev_, &send_bytes_, send_off[W]));
    EEP_RETURN_IF_ERROR(Reserve(&recv_dev_, &recv_bytes_, recv_off[W]));
    for (size_t p = 0; p < W; ++p)
      if (!send[p].empty())
        EEP_NCCL_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(send_dev_.get() + send_off[p], send[p].data(), send[p].size(),
                                                      cudaMemcpyHostToDevice, stream_));
    // 3. One grouped round of point-to-point transfers (empty ones skipped on both sides).
    out_spans.clear();
    in_spans.clear();
    for (int p = 0; p < world_; ++p) {
      const size_t sp = static_cast<size_t>(p);
      out_spans.push_back({p, send_dev_.get() + send_off[sp], send[sp].size()});
      in_spans.push_back({p, recv_dev_.get() + recv_off[sp], static_cast<size_t>(recv_sizes[sp])});
    }
    EEP_RETURN_IF_ERROR(SendRecv(out_spans, in_spans, "data exchange"));
    // 4. Back to the host (the stream is idle: these copies cannot wait on a peer).
    recv->assign(W, {});
    for (size_t p = 0; p < W; ++p) {
      auto& out = (*recv)[p];
      out.resize(static_cast<size_t>(recv_sizes[p]));
      if (!out.empty())
        EEP_NCCL_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(out.data(), recv_dev_.get() + recv_off[p], out.size(),
                                                      cudaMemcpyDeviceToHost, stream_));
    }
    EEP_RETURN_IF_ERROR_CTX(WaitComm(timeout_ms_, /*stream_too=*/true), "nccl: data exchange");
    return Status::Ok();
  }

 private:
  NcclCommunicator() = default;

  Status Check(ncclResult_t r, const char* what) {
    if (r == ncclSuccess || r == ncclInProgress) return Status::Ok();
    const char* last = comm_ != nullptr ? ncclGetLastError(comm_) : nullptr;
    std::string msg = fmt::format("nccl: {}: {}{}{}", what, ncclGetErrorString(r), last && *last ? ": " : "",
                                  last ? last : "");
    // A remote error or a broken connection means a peer failed.
    if (r == ncclRemoteError || r == ncclSystemError) return Status::RemoteDisconnect(msg);
    return Status::Internal(msg);
  }

  // One grouped round of ncclSend/ncclRecv (empty buffers skipped), waited for: the
  // point-to-point step of AllToAllV's size and data rounds and of ExchangeDevice.
  Status SendRecv(std::span<const DeviceSpan> sends, std::span<const DeviceSpan> recvs, const char* what) {
    EEP_RETURN_IF_ERROR(Group([&]() -> ncclResult_t {
      for (const DeviceSpan& d : sends) {
        if (d.bytes == 0) continue;
        const ncclResult_t r = ncclSend(d.data, d.bytes, ncclUint8, d.peer, comm_, stream_);
        if (r != ncclSuccess && r != ncclInProgress) return r;
      }
      for (const DeviceSpan& d : recvs) {
        if (d.bytes == 0) continue;
        const ncclResult_t r = ncclRecv(d.data, d.bytes, ncclUint8, d.peer, comm_, stream_);
        if (r != ncclSuccess && r != ncclInProgress) return r;
      }
      return ncclSuccess;
    }, what));
    return WaitComm(timeout_ms_, /*stream_too=*/true).WithContext(fmt::format("nccl: {}", what));
  }

  // Issues the ops of `body` as one group.
  template <typename F>
  Status Group(F&& body, const char* what) {
    ncclResult_t r = ncclGroupStart();
    if (r != ncclSuccess) return Check(r, "ncclGroupStart");
    ncclResult_t inner = body();
    r = ncclGroupEnd();
    EEP_RETURN_IF_ERROR_CTX(Check(inner, "ncclSend/ncclRecv"), what);
    return Check(r, "ncclGroupEnd");
  }

  // With shrinking on, an aborted exchange leaves the communicator to Shrink (which ends the
  // stuck operations itself) or to the destructor; otherwise it is torn down now.
  Status AbortNow() {
    if (comm_ != nullptr && !defer_abort_) {
      ncclCommAbort(comm_);
      comm_ = nullptr;
    }
    return Status::Cancelled("nccl: exchange aborted");
  }

  // Waits until the communicator has no operation in progress (and, with stream_too, the
  // stream's work is done), polling with a deadline. NCCL gives no waitable handle that
  // honours a deadline or an abort, so this polls, backing off to 100 µs between polls.
  Status WaitComm(int64_t timeout_ms, bool stream_too) {
    double deadline = NowSeconds() + static_cast<double>(timeout_ms) / 1000.0;
    int spins = 0;
    while (true) {
      if (aborted_.load()) return AbortNow();
      ncclResult_t async = ncclSuccess;
      ncclResult_t r = ncclCommGetAsyncError(comm_, &async);
      if (r != ncclSuccess) return Check(r, "ncclCommGetAsyncError");
      if (async != ncclSuccess && async != ncclInProgress) return Check(async, "asynchronous error");
      if (async == ncclSuccess) {
        if (!stream_too) return Status::Ok();
        const cudaError_t q = cudaStreamQuery(stream_);
        if (q == cudaSuccess) return Status::Ok();
        if (q != cudaErrorNotReady)
          return Status::Internal(fmt::format("nccl: stream failed: {}", cudaGetErrorString(q)));
      }
      if (NowSeconds() >= deadline) {
        silent_peers_.clear();
        for (int p = 0; p < world_; ++p)
          if (p != rank_) silent_peers_.push_back(p);
        if (KeepWaiting()) {
          deadline = NowSeconds() + static_cast<double>(timeout_ms) / 1000.0;
          continue;
        }
        return Status::Timeout(fmt::format("nccl: rank {}: no progress for {} ms (peers {})", rank_, timeout_ms,
                                           fmt::join(silent_peers_, ",")));
      }
      if (++spins < 64) std::this_thread::yield();
      else std::this_thread::sleep_for(std::chrono::microseconds(std::min(100, spins - 63)));
    }
  }

  Status Reserve(DeviceBytes* buf, size_t* have, size_t want) {
    if (want <= *have && *buf) return Status::Ok();
    // The stream is idle here (every exchange ends with a completed wait).
    buf->reset();
    *have = 0;
    void* p = nullptr;
    const size_t bytes = std::max<size_t>(want, 256);
    const cudaError_t e = cudaMalloc(&p, bytes);
    if (e != cudaSuccess)
      return Status::ResourceExhausted(fmt::format("nccl: cudaMalloc of {} bytes: {}", bytes, cudaGetErrorString(e)));
    buf->reset(static_cast<uint8_t*>(p));
    *have = bytes;
    return Status::Ok();
  }

  // EEP_NCCL_SHRINK=1: survivors shrink the communicator after a peer died instead of
  // aborting it and creating a fresh one (not yet measured across GPUs: off by default).
  static bool ShrinkEnabled() {
    const char* v = std::getenv("EEP_NCCL_SHRINK");
    return v != nullptr && std::string(v) == "1";
  }

  int rank_ = 0, world_ = 1, device_ = 0;
  bool defer_abort_ = false;
  int64_t timeout_ms_ = 1000;
  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
  std::atomic<bool> aborted_{false};
  DeviceBytes sizes_dev_, send_dev_, recv_dev_;
  size_t sizes_bytes_ = 0, send_bytes_ = 0, recv_bytes_ = 0;
};

}  // namespace

void RegisterNcclCommunicator() { RegisterCommunicator("nccl", &NcclCommunicator::Create); }

}  // namespace eep::ep
