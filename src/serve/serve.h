// The serving front end: an OpenAI-compatible HTTP API (`eep serve`) over a continuous-batching
// scheduler that drives the expert-parallel engine.
//
//   HTTP handler threads ──Submit──▶ Scheduler (one thread) ──Step──▶ StepEngine (EpEngine)
//            ▲                              │
//            └──── RequestHandle (tokens, finish; condition variable) ◀┘
//
// The scheduler owns the only thread that calls StepEngine::Step (EpEngine requires that). Every
// step it runs one token for each running sequence (decodes first), then admits waiting requests
// in FIFO order while their prompts fit in what is left of --max-num-batched-tokens and fewer
// than --max-num-seqs run; a prompt longer than the whole budget gets a step to itself. Requests
// join and leave the batch at every step. Handler threads block on their request's condition
// variable and see each token as soon as the step that produced it returns.
//
// Text-level concerns (detokenization, stop strings, chat templates, the OpenAI JSON) live in the
// HTTP layer; the scheduler deals in token ids only.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "core/status.h"
#include "ep/ep.h"
#include "model/config.h"
#include "model/sampling.h"

namespace httplib {
class Server;
}

namespace eep::serve {

// The socket options of every HTTP listener of `eep serve` (the server and a standby's): SO_REUSEADDR
// rather than httplib's default SO_REUSEPORT (with REUSEPORT a second server on a busy port would
// share it instead of failing, and the connections a killed server leaves behind, FIN_WAIT2 until
// their clients close them, keep a REUSEADDR bind off the port), close-on-exec (the ranks and
// backup managers this process starts do not hold the port).
void UseServeSocketOptions(httplib::Server& http);

// ---------------------------------------------------------------------------------------------
// Engine interface
// ---------------------------------------------------------------------------------------------

// Totals of the expert-parallel load balancer since start.
struct EplbTotals {
  int64_t rebalances = 0;
  int64_t moved_experts = 0;
};

// What the scheduler needs from an engine. The production implementation wraps ep::EpEngine
// (WrapEpEngine); tests substitute a fake. All methods are called from the scheduler thread
// only, so an implementation need not be thread-safe.
class StepEngine {
 public:
  virtual ~StepEngine() = default;
  // One batched step; one output per input, in input order (see ep::EpEngine::Step).
  virtual Result<std::vector<ep::SeqOutput>> Step(const std::vector<ep::SeqInput>& inputs) = 0;
  // Frees a finished sequence's state (applied with the next step).
  virtual void Release(int64_t seq_id) = 0;
  virtual ep::ClusterInfo Cluster() const = 0;
  // Per-MoE-layer, per-expert token counts over the engine's load window, [L][E] row-major.
  virtual std::vector<int64_t> ExpertLoad() const = 0;
  virtual int64_t NumMoeLayers() const = 0;
  virtual EplbTotals Eplb() const = 0;
  virtual const ModelConfig& config() const = 0;
  // Stops the engine (rank processes). Idempotent.
  virtual void Shutdown() = 0;
  // Handles what happened while idle (rank failures, ranks ready to join); see ep::EpEngine::Poll.
  virtual Status Poll() { return Status::Ok(); }
  // Starts growing or shrinking to `ep_size` ranks; the switch happens at a step boundary.
  virtual Status Scale(int ep_size) {
    (void)ep_size;
    return Status::Unimplemented("this engine cannot scale");
  }
};

// Adapts a started ep::EpEngine.
std::unique_ptr<StepEngine> WrapEpEngine(std::unique_ptr<ep::EpEngine> engine);

// ---------------------------------------------------------------------------------------------
// Scheduler
// ---------------------------------------------------------------------------------------------

struct SchedulerOptions {
  int64_t max_num_seqs = 64;              // sequences running at once
  int64_t max_num_batched_tokens = 2048;  // tokens (prefill + decode) per step
};
// max_num_seqs >= 1 and max_num_batched_tokens >= max_num_seqs (every running sequence must be
// able to decode in every step), as vLLM requires.
Status ValidateSchedulerOptions(const SchedulerOptions& options);

enum class FinishReason {
  kNone,     // still running
  kStop,     // a stop token (EOS) was produced
  kLength,   // max_tokens reached, or the context is full
  kAborted,  // cancelled: client went away, stop string matched, server shutting down
  kError,    // the engine failed
};
const char* FinishReasonName(FinishReason reason);

// One generation as the scheduler sees it: token ids in, token ids out.
struct GenerationRequest {
  std::vector<int64_t> prompt_ids;
  int64_t max_tokens = 16;
  SamplingParams sampling;
  // Tokens that end the generation (included in the output), usually the model's EOS ids.
  std::vector<int64_t> stop_token_ids;
};

// The shared state of one submitted request. The scheduler appends tokens and finishes it; any
// number of threads may wait on it or cancel it.
class RequestHandle {
 public:
  using Clock = std::chrono::steady_clock;

  RequestHandle(int64_t id, GenerationRequest request);
  RequestHandle(const RequestHandle&) = delete;
  RequestHandle& operator=(const RequestHandle&) = delete;

  struct Progress {
    std::vector<int64_t> tokens;                // tokens past the cursor
    FinishReason finish = FinishReason::kNone;  // set once every token has been returned
    Status error;                               // why, for kAborted and kError
  };
  // Blocks until there are tokens past `cursor` or the request has finished, or `deadline`
  // passes (then returns what there is, possibly nothing).
  Progress Wait(size_t cursor, std::optional<Clock::time_point> deadline = std::nullopt) const;

  // Asks the scheduler to stop this request; it finishes as kAborted with `reason` at the next
  // step boundary. Non-blocking; later calls are no-ops.
  void Cancel(Status reason);
  bool cancel_requested() const;

  int64_t id() const { return id_; }
  const GenerationRequest& request() const { return request_; }
  Clock::time_point arrival_time() const { return arrival_; }
  // Time of the first token, if any.
  std::optional<Clock::time_point> first_token_time() const;

 private:
  friend class Scheduler;
  // Scheduler side.
  void Push(int64_t token, FinishReason finish, Status error);
  void Finish(FinishReason finish, Status error);

  const int64_t id_;
  const GenerationRequest request_;
  const Clock::time_point arrival_;
  mutable std::mutex mu_;
  mutable std::condition_variable cv_;
  std::vector<int64_t> tokens_;
  FinishReason finish_ = FinishReason::kNone;
  Status error_;
  std::optional<Clock::time_point> first_token_;
  Status cancel_reason_;
  std::atomic<bool> cancel_requested_{false};
  std::function<void()> wake_scheduler_;  // set by Submit
};

// Counters and gauges of the scheduler and the engine, for /metrics, /v1/cluster and /health.
struct SchedulerStats {
  int64_t running = 0;
  int64_t waiting = 0;
  int64_t steps = 0;              // steps this scheduler ran
  int64_t prompt_tokens = 0;      // prefilled
  int64_t generation_tokens = 0;  // sampled
  Status engine_status;           // not OK once a step failed
  // Engine snapshot, refreshed by the scheduler thread after every step (the engine may only
  // be touched from that thread).
  ep::ClusterInfo cluster;
  std::vector<int64_t> expert_load;  // [L][E]
  int64_t num_moe_layers = 0;
  int64_t num_experts = 0;
  EplbTotals eplb;
  std::string scale_error;  // why the last scaling request failed, if it did
};

class Scheduler {
 public:
  // `engine` must outlive the scheduler.
  Scheduler(StepEngine* engine, SchedulerOptions options);
  ~Scheduler();
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  // Starts the step thread. Requests submitted before Start wait in the queue.
  Status Start();
  // Queues a request. InvalidArgument for an empty prompt, max_tokens < 1 or a prompt plus
  // max_tokens past the context; Unavailable once stopped or after an engine failure.
  Result<std::shared_ptr<RequestHandle>> Submit(GenerationRequest request);
  // Asks the engine to scale to `ep_size` ranks (done by the step thread; requests keep being
  // queued and served meanwhile). InvalidArgument for ep_size < 1; InProgress while an earlier
  // request is still being carried out.
  Status RequestScale(int ep_size);
  // Stops the step thread after its current step; everything queued or running finishes as
  // kAborted with `reason`. Idempotent.
  void Stop(Status reason = Status::Unavailable("server is shutting down"));

  SchedulerStats Stats() const;
  const SchedulerOptions& options() const { return options_; }
  const ModelConfig& config() const { return engine_->config(); }

 private:
  struct Seq {
    std::shared_ptr<RequestHandle> handle;
    bool prefilled = false;
    int64_t last_token = -1;
    int64_t generated = 0;
  };
  void Loop();
  void RefreshSnapshot();
  // Decides what runs next; moves admitted requests from waiting_ to `running`. Returns the
  // indices (into `running`) that take part in the step.
  std::vector<size_t> Plan(std::vector<Seq>* running);
  void FailAll(std::vector<Seq>* running, const Status& error);

  StepEngine* engine_;
  const SchedulerOptions options_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<RequestHandle>> waiting_;
  int64_t running_count_ = 0;
  bool stopping_ = false;
  bool wake_ = false;  // a cancel arrived
  Status stop_reason_;
  Status engine_status_;
  int64_t next_id_ = 1;
  int pending_scale_ = 0;  // 0: none
  // From an accepted RequestScale until the engine has no joining or draining rank left, so
  // that a second request is refused (409) instead of overwriting or racing the first.
  bool scale_busy_ = false;
  bool scale_issued_ = false;  // the engine's Scale was called for it
  std::string scale_error_;
  int64_t steps_ = 0, prompt_tokens_ = 0, generation_tokens_ = 0;
  bool last_step_solo_ = false;  // scheduler thread only
  mutable std::mutex snap_mu_;
  SchedulerStats snapshot_;  // engine part only
  std::thread thread_;
};

// ---------------------------------------------------------------------------------------------
// HTTP server
// ---------------------------------------------------------------------------------------------

struct ServerOptions {
  std::string model_dir;  // tokenizer.json (and tokenizer_config.json) are read from here
  std::string host = "127.0.0.1";
  int port = 8000;                // 0: any free port
  std::string served_model_name;  // "model" in requests and responses; default: model dir's name
  SchedulerOptions scheduler;
  int http_threads = 0;            // handler threads; 0: 2 * max_num_seqs + 16
  double shutdown_timeout_s = 30;  // graceful shutdown: how long in-flight requests may finish
};

// Endpoints:
//   POST /v1/completions, POST /v1/chat/completions   (OpenAI; SSE when "stream": true)
//   GET  /v1/models, /health, /metrics (Prometheus text), /v1/cluster (engine JSON)
//   POST /scale {"ep_size": N}                        (202; progress in /v1/cluster)
// Errors are OpenAI-style {"error": {"message", "type", "param", "code"}} with 4xx/5xx.
class Server {
 public:
  // Loads the tokenizer and chat template, starts the scheduler over `engine` (already
  // started) and listens. The server owns the engine and shuts it down on stop.
  static Result<std::unique_ptr<Server>> Start(ServerOptions options,
                                               std::unique_ptr<StepEngine> engine);
  ~Server();

  const std::string& host() const;
  int port() const;  // the bound port (the chosen one for port 0)

  // Starts shutting down (thread-safe, non-blocking; callable from a signal-watching thread):
  // new requests get 503, in-flight ones may finish for shutdown_timeout_s (at once when
  // `abort_in_flight`), then the listener, the scheduler and the engine stop.
  void RequestStop(bool abort_in_flight = false);
  // Blocks until RequestStop, then carries out the shutdown. Returns the engine's failure, if
  // it failed while serving.
  Status Wait();
  // RequestStop + Wait.
  Status Stop();

  class Impl;

 private:
  explicit Server(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace eep::serve
