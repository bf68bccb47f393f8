// Communicators: how ranks exchange tokens (dispatch/combine) and expert weights. One
// abstract interface, backends registered by name (`--ep-communicator shm|ucx|nccl`); adding one
// is a folder plus one EEP_REGISTER_COMMUNICATOR line.
//
// The one data-plane primitive is AllToAllV, a collective: every rank calls it the same
// number of times in the same order, with one (possibly empty) buffer per peer, and gets one
// buffer from each peer. Dispatch, combine and EPLB weight exchange are all AllToAllV rounds,
// so no tags or matching are needed. Every wait is bounded by a deadline; a timeout names the
// peers that did not answer.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "core/status.h"

namespace eep::ep {

// Out-of-band exchange used while a communicator is set up (the coordinator's control plane).
class Bootstrap {
 public:
  virtual ~Bootstrap() = default;
  // Every rank contributes `mine`; returns all contributions indexed by rank. Collective.
  virtual Result<std::vector<std::string>> AllGather(const std::string& mine) = 0;
};

struct CommunicatorOptions {
  int rank = 0;
  int world_size = 1;
  // Unique per engine instance (names shared-memory segments and the like).
  std::string session;
  int64_t peer_timeout_ms = 1000;
  // shm: bytes of one mailbox (per ordered pair of ranks); larger messages go in chunks.
  int64_t mailbox_bytes = 8 << 20;
  // nccl: the CUDA device of this rank; -1 = rank % visible devices.
  int device = -1;
};

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual const char* name() const = 0;
  virtual bool SupportsRemote() const = 0;  // can peers live on other hosts?
  virtual bool SupportsDevice() const = 0;  // can buffers be device memory?
  virtual int rank() const = 0;
  virtual int world_size() const = 0;

  // send[p] goes to rank p (send[rank()] to self); on return (*recv)[p] holds what rank p sent
  // to us. Fails with kTimeout naming the silent peers when nothing moves for the peer timeout
  // (large exchanges may take longer in total), kRemoteDisconnect when a peer's connection
  // fails, kCancelled if Abort() was called. Not thread-safe: one caller.
  virtual Status AllToAllV(const std::vector<std::span<const uint8_t>>& send,
                           std::vector<std::vector<uint8_t>>* recv) = 0;

  // Makes a blocked or future AllToAllV return kCancelled. Any thread.
  virtual void Abort() = 0;

  // ---- device memory (optional) ----------------------------------------------------------
  // A buffer in this rank's GPU memory and the peer (position) it goes to or comes from.
  struct DeviceSpan {
    int peer = 0;
    void* data = nullptr;
    size_t bytes = 0;
  };
  // True when ExchangeDevice moves GPU memory between ranks without host staging.
  virtual bool SupportsDeviceExchange() const { return false; }
  // Sends each sends[i] to its peer and fills each recvs[i] from its peer, GPU to GPU (EPLB
  // weight exchange: expert slots straight into a peer's device staging). For every ordered
  // pair of ranks the k-th send of a to b lands in the k-th recv of b from a; their sizes must
  // agree (both sides derive them from the same plan). Collective over the ranks that
  // exchange anything; waits, timeouts and Abort() as in AllToAllV.
  virtual Status ExchangeDevice(std::span<const DeviceSpan> sends, std::span<const DeviceSpan> recvs) {
    (void)sends, (void)recvs;
    return Status::Unimplemented(fmt::format("communicator '{}' has no device exchange", name()));
  }

  // A communicator over this one's ranks without `excluded` (positions; the survivors keep
  // their order), made from this one without a new bootstrap: after a peer died, the
  // survivors go on without re-creating from scratch (nccl: ncclCommShrink with
  // NCCL_SHRINK_ABORT, which also ends what was in flight on this one). Collective over the
  // survivors. kUnimplemented where a backend cannot: the caller then creates a new one.
  virtual Result<std::unique_ptr<Communicator>> Shrink(const std::vector<int>& excluded) {
    (void)excluded;
    return Status::Unimplemented(fmt::format("communicator '{}' cannot shrink", name()));
  }

  // The peers that stayed silent in the last AllToAllV that timed out (suspects for the
  // coordinator to confirm); empty otherwise.
  const std::vector<int>& silent_peers() const { return silent_peers_; }

  // Called on the exchanging thread when peers stay silent for the peer timeout. Returning
  // true keeps waiting (the owner has reported them as suspects and waits to be aborted if
  // they are confirmed dead: a slow peer is not a dead one); false fails the exchange with
  // kTimeout. Without a handler the exchange fails.
  void SetSilenceHandler(std::function<bool(const std::vector<int>& peers)> handler) {
    on_silence_ = std::move(handler);
  }

 protected:
  bool KeepWaiting() { return on_silence_ && on_silence_(silent_peers_); }
  std::vector<int> silent_peers_;
  std::function<bool(const std::vector<int>&)> on_silence_;
};

using CommunicatorFactory =
    std::function<Result<std::unique_ptr<Communicator>>(const CommunicatorOptions&, Bootstrap*)>;

// Registers a backend under `name`; returns true (for static registration).
bool RegisterCommunicator(const std::string& name, CommunicatorFactory factory);
std::vector<std::string> CommunicatorNames();
// Creates the named communicator; InvalidArgument listing the known names if unknown.
Result<std::unique_ptr<Communicator>> CreateCommunicator(const std::string& name,
                                                         const CommunicatorOptions& options,
                                                         Bootstrap* bootstrap);

}  // namespace eep::ep

#define EEP_REGISTER_COMMUNICATOR(ident, name, factory) \
  static const bool eep_communicator_##ident = ::eep::ep::RegisterCommunicator(name, factory)
