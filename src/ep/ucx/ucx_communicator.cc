// ucx communicator: ranks exchange through UCP tagged messages, over whatever transports UCX
// finds (shared memory, cma, tcp, RDMA verbs); this is the path between hosts.
//
// AllToAllV round n: every rank posts one tagged send per peer, tag = (n << 32 | sender),
// and receives one message per peer by probing for that exact tag (the size travels with the
// message). Waiting sleeps on the worker's event fd (ucp_worker_arm + poll) together with an
// abort eventfd, bounded by the peer deadline. A peer whose endpoint fails is reported as
// kRemoteDisconnect; one that stays silent as kTimeout naming it.
#include <poll.h>
#include <sys/eventfd.h>
#include <ucp/api/ucp.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <fmt/format.h>

#include "core/logging.h"
#include "core/util.h"
#include "ep/communicator.h"
#include "ep/internal.h"

namespace eep::ep {
namespace {

std::string Hex(const void* p, size_t n) {
  static const char* d = "0123456789abcdef";
  std::string s;
  const auto* b = static_cast<const uint8_t*>(p);
  for (size_t i = 0; i < n; ++i) {
    s.push_back(d[b[i] >> 4]);
    s.push_back(d[b[i] & 15]);
  }
  return s;
}

std::string Unhex(const std::string& s) {
  std::string out(s.size() / 2, '\0');
  auto v = [](char c) { return c <= '9' ? c - '0' : c - 'a' + 10; };
  for (size_t i = 0; i < out.size(); ++i) out[i] = static_cast<char>(v(s[2 * i]) << 4 | v(s[2 * i + 1]));
  return out;
}

constexpr uint64_t kFullMask = ~uint64_t{0};

class UcxCommunicator : public Communicator {
 public:
  const char* name() const override { return "ucx"; }
  bool SupportsRemote() const override { return true; }
  bool SupportsDevice() const override { return false; }
  int rank() const override { return rank_; }
  int world_size() const override { return world_; }

  ~UcxCommunicator() override {
    for (ucp_ep_h ep : eps_) {
      if (ep == nullptr) continue;
      ucp_request_param_t p{};
      p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
      p.flags = UCP_EP_CLOSE_FLAG_FORCE;
      void* req = ucp_ep_close_nbx(ep, &p);
      if (UCS_PTR_IS_PTR(req)) {
        while (ucp_request_check_status(req) == UCS_INPROGRESS) ucp_worker_progress(worker_);
        ucp_request_free(req);
      }
    }
    if (worker_) ucp_worker_destroy(worker_);
    if (context_) ucp_cleanup(context_);
    if (abort_fd_ >= 0) close(abort_fd_);
  }

  static Result<std::unique_ptr<Communicator>> Create(const CommunicatorOptions& o, Bootstrap* boot) {
    auto c = std::unique_ptr<UcxCommunicator>(new UcxCommunicator());
    c->rank_ = o.rank;
    c->world_ = o.world_size;
    c->timeout_ms_ = o.peer_timeout_ms;
    c->abort_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    ucp_config_t* config = nullptr;
    if (ucp_config_read(nullptr, nullptr, &config) != UCS_OK) return Status::Unavailable("ucx: cannot read UCX config");
    ucp_params_t params{};
    params.field_mask = UCP_PARAM_FIELD_FEATURES;
    params.features = UCP_FEATURE_TAG | UCP_FEATURE_WAKEUP;
    ucs_status_t s = ucp_init(&params, config, &c->context_);
    ucp_config_release(config);
    if (s != UCS_OK) return Status::Unavailable(fmt::format("ucx: ucp_init: {}", ucs_status_string(s)));
    ucp_worker_params_t wp{};
    wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
    wp.thread_mode = UCS_THREAD_MODE_SINGLE;
    s = ucp_worker_create(c->context_, &wp, &c->worker_);
    if (s != UCS_OK) return Status::Unavailable(fmt::format("ucx: ucp_worker_create: {}", ucs_status_string(s)));
    if (ucp_worker_get_efd(c->worker_, &c->efd_) != UCS_OK) return Status::Unavailable("ucx: no worker event fd");
    ucp_address_t* addr = nullptr;
    size_t addr_len = 0;
    s = ucp_worker_get_address(c->worker_, &addr, &addr_len);
    if (s != UCS_OK) return Status::Unavailable(fmt::format("ucx: ucp_worker_get_address: {}", ucs_status_string(s)));
    std::string mine = Hex(addr, addr_len);
    ucp_worker_release_address(c->worker_, addr);
    EEP_ASSIGN_OR_RETURN(auto all, boot->AllGather(mine));
    c->eps_.assign(static_cast<size_t>(o.world_size), nullptr);
    c->failed_.reset(new std::atomic<bool>[static_cast<size_t>(o.world_size)]);
    c->err_args_.resize(static_cast<size_t>(o.world_size));
    for (int p = 0; p < o.world_size; ++p) {
      c->failed_[static_cast<size_t>(p)] = false;
      std::string peer = Unhex(all[static_cast<size_t>(p)]);
      c->err_args_[static_cast<size_t>(p)] = {c.get(), p};
      ucp_ep_params_t ep{};
      ep.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE | UCP_EP_PARAM_FIELD_ERR_HANDLER;
      ep.address = reinterpret_cast<const ucp_address_t*>(peer.data());
      ep.err_mode = UCP_ERR_HANDLING_MODE_PEER;
      ep.err_handler.cb = &UcxCommunicator::OnEpError;
      ep.err_handler.arg = &c->err_args_[static_cast<size_t>(p)];
      s = ucp_ep_create(c->worker_, &ep, &c->eps_[static_cast<size_t>(p)]);
      if (s != UCS_OK) return Status::Unavailable(fmt::format("ucx: endpoint to rank {}: {}", p, ucs_status_string(s)));
    }
    // Everyone has endpoints before the first exchange.
    EEP_RETURN_IF_ERROR(boot->AllGather("connected").status());
    return std::unique_ptr<Communicator>(std::move(c));
  }

  void Abort() override {
    aborted_.store(true);
    uint64_t one = 1;
    (void)!write(abort_fd_, &one, sizeof one);
  }

  Status AllToAllV(const std::vector<std::span<const uint8_t>>& send,
                   std::vector<std::vector<uint8_t>>* recv) override {
    if (static_cast<int>(send.size()) != world_)
      return Status::InvalidArgument(fmt::format("AllToAllV: {} send buffers for {} ranks", send.size(), world_));
    const uint64_t round = ++round_;
    recv->assign(static_cast<size_t>(world_), {});
    std::vector<void*> sreq(static_cast<size_t>(world_), nullptr), rreq(static_cast<size_t>(world_), nullptr);
    std::vector<bool> sdone(static_cast<size_t>(world_), false), rposted(static_cast<size_t>(world_), false),
        rdone(static_cast<size_t>(world_), false);
    static const uint8_t kEmpty = 0;
    Status error;
    for (int p = 0; p < world_; ++p) {
      ucp_request_param_t prm{};
      const uint64_t tag = (round << 32) | static_cast<uint64_t>(rank_);
      const auto& buf = send[static_cast<size_t>(p)];
      void* req = ucp_tag_send_nbx(eps_[static_cast<size_t>(p)], buf.empty() ? &kEmpty : buf.data(), buf.size(), tag, &prm);
      if (UCS_PTR_IS_ERR(req)) return Status::RemoteDisconnect(fmt::format("rank {}: send to rank {}: {}", rank_, p, ucs_status_string(UCS_PTR_STATUS(req))));
      sreq[static_cast<size_t>(p)] = req;
      sdone[static_cast<size_t>(p)] = req == nullptr;
    }
    // The deadline bounds silence, not size: it restarts whenever a message completes.
    double deadline = NowSeconds() + static_cast<double>(timeout_ms_) / 1000.0;
    int completed = 0;
    while (true) {
      if (ucp_worker_progress(worker_) > 0) deadline = NowSeconds() + static_cast<double>(timeout_ms_) / 1000.0;
      int now_completed = 0;
      bool all = true;
      for (int p = 0; p < world_; ++p) {
        const size_t pi = static_cast<size_t>(p);
        if (failed_[pi].load()) error = Status::RemoteDisconnect(fmt::format("rank {}: connection to rank {} failed", rank_, p));
        if (!sdone[pi]) {
          ucs_status_t st = ucp_request_check_status(sreq[pi]);
          if (st != UCS_INPROGRESS) {
            ucp_request_free(sreq[pi]);
            sreq[pi] = nullptr;
            sdone[pi] = true;
            if (st != UCS_OK) error = Status::RemoteDisconnect(fmt::format("rank {}: send to rank {}: {}", rank_, p, ucs_status_string(st)));
          }
        }
        if (!rposted[pi]) {
          ucp_tag_recv_info_t info{};
          const uint64_t tag = (round << 32) | static_cast<uint64_t>(p);
          ucp_tag_message_h msg = ucp_tag_probe_nb(worker_, tag, kFullMask, 1, &info);
          if (msg != nullptr) {
            auto& buf = (*recv)[pi];
            buf.resize(info.length);
            ucp_request_param_t prm{};
            void* req = ucp_tag_msg_recv_nbx(worker_, buf.empty() ? const_cast<uint8_t*>(&kEmpty) : buf.data(), info.length, msg, &prm);
            if (UCS_PTR_IS_ERR(req)) return Status::RemoteDisconnect(fmt::format("rank {}: receive from rank {} failed", rank_, p));
            rposted[pi] = true;
            rreq[pi] = req;
            rdone[pi] = req == nullptr;
          }
        } else if (!rdone[pi]) {
          ucs_status_t st = ucp_request_check_status(rreq[pi]);
          if (st != UCS_INPROGRESS) {
            ucp_request_free(rreq[pi]);
            rreq[pi] = nullptr;
            rdone[pi] = true;
            if (st != UCS_OK) error = Status::RemoteDisconnect(fmt::format("rank {}: receive from rank {}: {}", rank_, p, ucs_status_string(st)));
          }
        }
        all = all && sdone[pi] && rdone[pi];
        now_completed += sdone[pi] + rdone[pi];
      }
      if (now_completed > completed) {
        completed = now_completed;
        deadline = NowSeconds() + static_cast<double>(timeout_ms_) / 1000.0;
      }
      if (!error.ok()) {
        CancelAll(&sreq, &rreq);
        return error;
      }
      if (all) return Status::Ok();
      if (aborted_.load()) {
        CancelAll(&sreq, &rreq);
        return Status::Cancelled(fmt::format("rank {}: exchange aborted", rank_));
      }
      const double left = deadline - NowSeconds();
      if (left <= 0) {
        std::string peers;
        silent_peers_.clear();
        for (int p = 0; p < world_; ++p)
          if (!sdone[static_cast<size_t>(p)] || !rdone[static_cast<size_t>(p)]) {
            peers += (peers.empty() ? "" : ", ") + std::to_string(p);
            silent_peers_.push_back(p);
          }
        if (KeepWaiting()) {
          deadline = NowSeconds() + static_cast<double>(timeout_ms_) / 1000.0;
          continue;
        }
        CancelAll(&sreq, &rreq);
        return Status::Timeout(fmt::format("rank {}: no answer from rank(s) {} within {} ms", rank_, peers, timeout_ms_));
      }
      // Sleep until UCX has events (or abort), unless there is work right now.
      if (ucp_worker_arm(worker_) == UCS_OK) {
        struct pollfd fds[2] = {{efd_, POLLIN, 0}, {abort_fd_, POLLIN, 0}};
        poll(fds, 2, std::max(1, static_cast<int>(left * 1000)));
      }
    }
  }

 private:
  struct ErrArg {
    UcxCommunicator* self;
    int peer;
  };
  static void OnEpError(void* arg, ucp_ep_h, ucs_status_t status) {
    auto* a = static_cast<ErrArg*>(arg);
    a->self->failed_[static_cast<size_t>(a->peer)].store(true);
    EEP_LOG_WARN("rank {}: UCX endpoint to rank {} failed: {}", a->self->rank_, a->peer, ucs_status_string(status));
  }

  void CancelAll(std::vector<void*>* sreq, std::vector<void*>* rreq) {
    for (auto* v : {sreq, rreq})
      for (void*& r : *v) {
        if (r == nullptr) continue;
        ucp_request_cancel(worker_, r);
        ucp_request_free(r);
        r = nullptr;
      }
  }

  UcxCommunicator() = default;
  int rank_ = 0, world_ = 1;
  int64_t timeout_ms_ = 1000;
  ucp_context_h context_ = nullptr;
  ucp_worker_h worker_ = nullptr;
  int efd_ = -1, abort_fd_ = -1;
  std::vector<ucp_ep_h> eps_;
  std::unique_ptr<std::atomic<bool>[]> failed_;
  std::vector<ErrArg> err_args_;
  uint64_t round_ = 0;
  std::atomic<bool> aborted_{false};
};

}  // namespace

void RegisterUcxCommunicator() { RegisterCommunicator("ucx", &UcxCommunicator::Create); }

}  // namespace eep::ep
