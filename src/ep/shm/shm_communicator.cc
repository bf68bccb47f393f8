// shm communicator: ranks on one host exchange through shared memory.
//
// Each rank owns one segment: a header with a doorbell word, then one single-slot mailbox per
// source rank: `// [header 4 KiB][mailbox from rank 0][mailbox from rank 1]...`. A sender
// copies a chunk into the receiver's mailbox for it and bumps write_seq; the receiver copies
// it out and bumps read_seq. Whoever changes a mailbox rings the other side's doorbell (a
// futex), so a rank waiting for progress on any channel sleeps on one word, with a deadline.
#include <fcntl.h>
#include <linux/futex.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstring>
#include <fmt/format.h>

#include "core/logging.h"
#include "core/util.h"
#include "ep/communicator.h"
#include "ep/internal.h"

namespace eep::ep {
namespace {

constexpr uint32_t kMagic = 0xEE9C0111u;
constexpr size_t kHeaderBytes = 4096;
constexpr size_t kMailboxHeaderBytes = 64;

struct SegmentHeader {
  uint32_t magic;
  std::atomic<uint32_t> doorbell;
  uint32_t world_size;
  uint32_t pad;
  uint64_t mailbox_bytes;
};

struct MailboxHeader {
  std::atomic<uint32_t> write_seq;
  std::atomic<uint32_t> read_seq;
  uint64_t chunk_bytes;   // bytes in the current chunk
  uint64_t total_bytes;   // bytes of the whole message (valid in its first chunk)
};

void FutexWake(std::atomic<uint32_t>* word) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAKE, INT_MAX, nullptr, nullptr, 0);
}

// Sleeps while *word == expected, at most timeout_ms.
void FutexWait(std::atomic<uint32_t>* word, uint32_t expected, int64_t timeout_ms) {
  struct timespec ts {
    static_cast<time_t>(timeout_ms / 1000), static_cast<long>((timeout_ms % 1000) * 1000000)
  };
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAIT, expected, &ts, nullptr, 0);
}

class Segment {
 public:
  ~Segment() {
    if (base_ != nullptr) munmap(base_, bytes_);
  }
  static Result<std::unique_ptr<Segment>> Map(const std::string& name, size_t bytes, bool create) {
    int flags = O_RDWR | (create ? O_CREAT | O_EXCL : 0);
    int fd = shm_open(name.c_str(), flags, 0600);
    if (fd < 0) return Status::IOError(fmt::format("shm_open {}: {}", name, std::strerror(errno)));
    if (create && ftruncate(fd, static_cast<off_t>(bytes)) != 0) {
      close(fd);
      shm_unlink(name.c_str());
      return Status::ResourceExhausted(fmt::format("ftruncate {} to {} bytes: {}", name, bytes, std::strerror(errno)));
    }
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (p == MAP_FAILED) return Status::IOError(fmt::format("mmap {}: {}", name, std::strerror(errno)));
    auto s = std::unique_ptr<Segment>(new Segment());
    s->base_ = static_cast<uint8_t*>(p);
    s->bytes_ = bytes;
    return s;
  }
  SegmentHeader* header() { return reinterpret_cast<SegmentHeader*>(base_); }
  MailboxHeader* mailbox(int src, size_t mailbox_bytes) {
    return reinterpret_cast<MailboxHeader*>(base_ + kHeaderBytes + static_cast<size_t>(src) * (kMailboxHeaderBytes + mailbox_bytes));
  }
  uint8_t* data(int src, size_t mailbox_bytes) { return reinterpret_cast<uint8_t*>(mailbox(src, mailbox_bytes)) + kMailboxHeaderBytes; }

 private:
  Segment() = default;
  uint8_t* base_ = nullptr;
  size_t bytes_ = 0;
};

class ShmCommunicator : public Communicator {
 public:
  const char* name() const override { return "shm"; }
  bool SupportsRemote() const override { return false; }
  bool SupportsDevice() const override { return false; }
  int rank() const override { return rank_; }
  int world_size() const override { return world_; }

  static Result<std::unique_ptr<Communicator>> Create(const CommunicatorOptions& o, Bootstrap* boot) {
    auto c = std::unique_ptr<ShmCommunicator>(new ShmCommunicator());
    c->rank_ = o.rank;
    c->world_ = o.world_size;
    c->timeout_ms_ = o.peer_timeout_ms;
    c->mailbox_bytes_ = static_cast<size_t>(std::max<int64_t>(4096, o.mailbox_bytes));
    const size_t seg_bytes = kHeaderBytes + static_cast<size_t>(o.world_size) * (kMailboxHeaderBytes + c->mailbox_bytes_);
    const std::string mine = fmt::format("/eep-{}-r{}", o.session, o.rank);
    shm_unlink(mine.c_str());  // a leftover of a crashed run with the same session name
    EEP_ASSIGN_OR_RETURN_CTX(auto own, Segment::Map(mine, seg_bytes, true), fmt::format("rank {}", o.rank));
    auto* h = own->header();
    h->world_size = static_cast<uint32_t>(o.world_size);
    h->mailbox_bytes = c->mailbox_bytes_;
    h->doorbell.store(0);
    h->magic = kMagic;
    // Barrier 1: every segment exists. Then map the peers', barrier 2, and unlink our name so
    // nothing is left behind whatever happens later.
    auto names = boot->AllGather(mine);
    if (!names.ok()) {
      shm_unlink(mine.c_str());
      return names.status();
    }
    c->segments_.resize(static_cast<size_t>(o.world_size));
    for (int p = 0; p < o.world_size; ++p) {
      if (p == o.rank) continue;
      auto seg = Segment::Map((*names)[static_cast<size_t>(p)], seg_bytes, false);
      if (!seg.ok()) {
        shm_unlink(mine.c_str());
        return seg.status().WithContext(fmt::format("rank {} mapping rank {}", o.rank, p));
      }
      if ((*seg)->header()->magic != kMagic) {
        shm_unlink(mine.c_str());
        return Status::Internal(fmt::format("rank {}: segment of rank {} is not initialised", o.rank, p));
      }
      c->segments_[static_cast<size_t>(p)] = std::move(*seg);
    }
    c->segments_[static_cast<size_t>(o.rank)] = std::move(own);
    auto done = boot->AllGather("mapped");
    shm_unlink(mine.c_str());
    if (!done.ok()) return done.status();
    return std::unique_ptr<Communicator>(std::move(c));
  }

  void Abort() override {
    aborted_.store(true);
    auto* h = segments_[static_cast<size_t>(rank_)]->header();
    h->doorbell.fetch_add(1);
    FutexWake(&h->doorbell);
  }

  Status AllToAllV(const std::vector<std::span<const uint8_t>>& send,
                   std::vector<std::vector<uint8_t>>* recv) override {
    if (static_cast<int>(send.size()) != world_)
      return Status::InvalidArgument(fmt::format("AllToAllV: {} send buffers for {} ranks", send.size(), world_));
    recv->assign(static_cast<size_t>(world_), {});
    std::vector<size_t> sent(static_cast<size_t>(world_), 0), got(static_cast<size_t>(world_), 0);
    std::vector<bool> send_done(static_cast<size_t>(world_), false), recv_done(static_cast<size_t>(world_), false),
        recv_started(static_cast<size_t>(world_), false);
    auto* me = segments_[static_cast<size_t>(rank_)].get();
    // The deadline bounds silence, not size: it restarts whenever any chunk moves.
    double deadline = NowSeconds() + static_cast<double>(timeout_ms_) / 1000.0;
    int pending = 2 * world_;
    while (pending > 0) {
      if (aborted_.load()) return Status::Cancelled(fmt::format("rank {}: exchange aborted", rank_));
      const uint32_t bell = me->header()->doorbell.load(std::memory_order_acquire);
      bool progress = false;
      for (int p = 0; p < world_; ++p) {
        const size_t pi = static_cast<size_t>(p);
        // Send a chunk to p when its mailbox for us is empty.
        if (!send_done[pi]) {
          Segment* peer = segments_[pi].get();
          MailboxHeader* mb = peer->mailbox(rank_, mailbox_bytes_);
          if (mb->write_seq.load(std::memory_order_acquire) == mb->read_seq.load(std::memory_order_acquire)) {
            const size_t n = std::min(mailbox_bytes_, send[pi].size() - sent[pi]);
            if (n > 0) std::memcpy(peer->data(rank_, mailbox_bytes_), send[pi].data() + sent[pi], n);
            mb->chunk_bytes = n;
            mb->total_bytes = send[pi].size();
            sent[pi] += n;
            mb->write_seq.fetch_add(1, std::memory_order_release);
            Ring(peer);
            if (sent[pi] == send[pi].size()) {
              send_done[pi] = true;
              --pending;
            }
            progress = true;
          }
        }
        // Take a chunk from p's mailbox in our segment.
        if (!recv_done[pi]) {
          MailboxHeader* mb = me->mailbox(p, mailbox_bytes_);
          if (mb->write_seq.load(std::memory_order_acquire) != mb->read_seq.load(std::memory_order_acquire)) {
            auto& buf = (*recv)[pi];
            if (!recv_started[pi]) {
              buf.resize(mb->total_bytes);
              recv_started[pi] = true;
            }
            const size_t n = mb->chunk_bytes;
            if (got[pi] + n > buf.size())
              return Status::Corruption(fmt::format("rank {}: rank {} sent more bytes than announced", rank_, p));
            if (n > 0) std::memcpy(buf.data() + got[pi], me->data(p, mailbox_bytes_), n);
            got[pi] += n;
            mb->read_seq.fetch_add(1, std::memory_order_release);
            Ring(segments_[pi].get());
            if (got[pi] == buf.size()) {
              recv_done[pi] = true;
              --pending;
            }
            progress = true;
          }
        }
      }
      if (progress || pending == 0) {
        deadline = NowSeconds() + static_cast<double>(timeout_ms_) / 1000.0;
        continue;
      }
      const double left_s = deadline - NowSeconds();
      if (left_s <= 0) {
        std::string peers;
        silent_peers_.clear();
        for (int p = 0; p < world_; ++p)
          if (!send_done[static_cast<size_t>(p)] || !recv_done[static_cast<size_t>(p)])
          {
            peers += (peers.empty() ? "" : ", ") + std::to_string(p);
            silent_peers_.push_back(p);
          }
        if (KeepWaiting()) {
          deadline = NowSeconds() + static_cast<double>(timeout_ms_) / 1000.0;
          continue;
        }
        return Status::Timeout(fmt::format("rank {}: no answer from rank(s) {} within {} ms", rank_, peers, timeout_ms_));
      }
      FutexWait(&me->header()->doorbell, bell, std::max<int64_t>(1, static_cast<int64_t>(left_s * 1000)));
    }
    return Status::Ok();
  }

 private:
  ShmCommunicator() = default;
  static void Ring(Segment* s) {
    s->header()->doorbell.fetch_add(1, std::memory_order_release);
    FutexWake(&s->header()->doorbell);
  }

  int rank_ = 0, world_ = 1;
  int64_t timeout_ms_ = 1000;
  size_t mailbox_bytes_ = 0;
  std::vector<std::unique_ptr<Segment>> segments_;
  std::atomic<bool> aborted_{false};
};

}  // namespace

void RegisterShmCommunicator() { RegisterCommunicator("shm", &ShmCommunicator::Create); }

}  // namespace eep::ep
