// Continuous batching: one thread plans and runs every engine step (see serve.h).
#include <fmt/format.h>

#include <algorithm>
#include <utility>
#include <unordered_map>

#include "core/logging.h"
#include "serve/serve.h"

namespace eep::serve {

const char* FinishReasonName(FinishReason reason) {
  switch (reason) {
    case FinishReason::kNone: return "none";
    case FinishReason::kStop: return "stop";
    case FinishReason::kLength: return "length";
    case FinishReason::kAborted: return "abort";
    case FinishReason::kError: return "error";
  }
  return "unknown";
}

Status ValidateSchedulerOptions(const SchedulerOptions& o) {
  if (o.max_num_seqs < 1)
    return Status::InvalidArgument(
        fmt::format("--max-num-seqs must be >= 1 (got {})", o.max_num_seqs));
  if (o.max_num_batched_tokens < o.max_num_seqs)
    return Status::InvalidArgument(
        fmt::format("--max-num-batched-tokens ({}) must be >= --max-num-seqs ({}) so every running "
                    "sequence can decode in every step",
                    o.max_num_batched_tokens, o.max_num_seqs));
  return Status::Ok();
}

// ---------------------------------------------------------------------------------------------
// RequestHandle
// ---------------------------------------------------------------------------------------------

RequestHandle::RequestHandle(int64_t id, GenerationRequest request)
    : id_(id), request_(std::move(request)), arrival_(Clock::now()) {}

RequestHandle::Progress RequestHandle::Wait(size_t cursor,
                                            std::optional<Clock::time_point> deadline) const {
  std::unique_lock lk(mu_);
  auto ready = [&] { return tokens_.size() > cursor || finish_ != FinishReason::kNone; };
  if (deadline)
    cv_.wait_until(lk, *deadline, ready);
  else
    cv_.wait(lk, ready);
  Progress p;
  if (tokens_.size() > cursor)
    p.tokens.assign(tokens_.begin() + static_cast<ptrdiff_t>(cursor), tokens_.end());
  p.finish = finish_;
  p.error = error_;
  return p;
}

void RequestHandle::Cancel(Status reason) {
  std::function<void()> wake;
  {
    std::lock_guard lk(mu_);
    if (cancel_requested_ || finish_ != FinishReason::kNone) return;
    cancel_reason_ = std::move(reason);
    cancel_requested_ = true;
    wake = wake_scheduler_;
  }
  if (wake) wake();
}

bool RequestHandle::cancel_requested() const {
  return cancel_requested_.load();
}

std::optional<RequestHandle::Clock::time_point> RequestHandle::first_token_time() const {
  std::lock_guard lk(mu_);
  return first_token_;
}

void RequestHandle::Push(int64_t token, FinishReason finish, Status error) {
  {
    std::lock_guard lk(mu_);
    if (finish_ != FinishReason::kNone) return;
    if (!first_token_) first_token_ = Clock::now();
    tokens_.push_back(token);
    finish_ = finish;
    error_ = std::move(error);
  }
  cv_.notify_all();
}

void RequestHandle::Finish(FinishReason finish, Status error) {
  {
    std::lock_guard lk(mu_);
    if (finish_ != FinishReason::kNone) return;
    finish_ = finish;
    if (finish == FinishReason::kAborted && !cancel_reason_.ok() && error.ok())
      error = cancel_reason_;
    error_ = std::move(error);
  }
  cv_.notify_all();
}

// ---------------------------------------------------------------------------------------------
// Scheduler
// ---------------------------------------------------------------------------------------------

Scheduler::Scheduler(StepEngine* engine, SchedulerOptions options)
    : engine_(engine), options_(options) {}

Scheduler::~Scheduler() {
  Stop();
}

Status Scheduler::Start() {
  EEP_RETURN_IF_ERROR(ValidateSchedulerOptions(options_));
  {
    std::lock_guard lk(mu_);
    if (thread_.joinable() || stopping_)
      return Status::InvalidArgument("scheduler already started or stopped");
  }
  RefreshSnapshot();  // (takes mu_ itself; the step thread does not run yet)
  std::lock_guard lk(mu_);
  thread_ = std::thread([this] { Loop(); });
  return Status::Ok();
}

Result<std::shared_ptr<RequestHandle>> Scheduler::Submit(GenerationRequest request) {
  const int64_t ctx = engine_->config().max_position_embeddings;
  const int64_t n = static_cast<int64_t>(request.prompt_ids.size());
  if (n == 0) return Status::InvalidArgument("the prompt is empty");
  if (request.max_tokens < 1)
    return Status::InvalidArgument(
        fmt::format("max_tokens must be >= 1 (got {})", request.max_tokens));
  if (ctx > 0 && n + request.max_tokens > ctx)
    return Status::InvalidArgument(
        fmt::format("the prompt ({} tokens) plus max_tokens ({}) exceeds the context of {} tokens",
                    n, request.max_tokens, ctx));
  std::lock_guard lk(mu_);
  if (!engine_status_.ok())
    return Status::Unavailable("engine failed: " + engine_status_.message());
  if (stopping_) return Status::Unavailable(stop_reason_.message());
  auto handle = std::make_shared<RequestHandle>(next_id_++, std::move(request));
  handle->wake_scheduler_ = [this] {
    {
      std::lock_guard lk2(mu_);
      wake_ = true;
    }
    cv_.notify_all();
  };
  waiting_.push_back(handle);
  cv_.notify_all();
  return handle;
}

void Scheduler::Stop(Status reason) {
  {
    std::lock_guard lk(mu_);
    if (!stopping_) {
      stopping_ = true;
      stop_reason_ = reason;
    }
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
  // Whatever never reached the thread (stopped before Start, or queued during the last step).
  std::deque<std::shared_ptr<RequestHandle>> left;
  {
    std::lock_guard lk(mu_);
    left.swap(waiting_);
  }
  for (auto& h : left) h->Finish(FinishReason::kAborted, stop_reason_);
}

Status Scheduler::RequestScale(int ep_size) {
  if (ep_size < 1) return Status::InvalidArgument(fmt::format("ep_size must be >= 1, got {}", ep_size));
  {
    std::lock_guard lk(mu_);
    if (stopping_) return Status::Unavailable("server is shutting down");
    if (!engine_status_.ok()) return Status::Unavailable("engine failed: " + engine_status_.message());
    if (scale_busy_) return Status(StatusCode::kInProgress, "a scaling step is in progress");
    pending_scale_ = ep_size;
    scale_busy_ = true;
    scale_issued_ = false;
  }
  cv_.notify_all();
  return Status::Ok();
}

SchedulerStats Scheduler::Stats() const {
  SchedulerStats s;
  {
    std::lock_guard lk(snap_mu_);
    s = snapshot_;
  }
  std::lock_guard lk(mu_);
  s.running = running_count_;
  s.waiting = static_cast<int64_t>(waiting_.size());
  s.steps = steps_;
  s.prompt_tokens = prompt_tokens_;
  s.generation_tokens = generation_tokens_;
  s.engine_status = engine_status_;
  s.scale_error = scale_error_;
  return s;
}

void Scheduler::RefreshSnapshot() {
  SchedulerStats s;
  s.cluster = engine_->Cluster();
  s.expert_load = engine_->ExpertLoad();
  s.num_moe_layers = engine_->NumMoeLayers();
  s.num_experts = engine_->config().num_experts;
  s.eplb = engine_->Eplb();
  bool changing = false;
  for (const auto& r : s.cluster.ranks) changing = changing || r.state == "joining" || r.state == "draining";
  {
    std::lock_guard lk(mu_);
    if (scale_issued_ && !changing) scale_busy_ = scale_issued_ = false;
  }
  std::lock_guard lk(snap_mu_);
  snapshot_ = std::move(s);
}

std::vector<size_t> Scheduler::Plan(std::vector<Seq>* running) {
  const int64_t budget_max = options_.max_num_batched_tokens;
  std::vector<size_t> step;
  int64_t budget = budget_max;
  // Decodes first: every running sequence gets its next token (the options guarantee they fit).
  for (size_t i = 0; i < running->size(); ++i) {
    step.push_back(i);
    budget -= 1;
  }
  const size_t decodes = step.size();
  bool solo = false;
  std::lock_guard lk(mu_);
  while (!waiting_.empty() && static_cast<int64_t>(running->size()) < options_.max_num_seqs) {
    const int64_t len = static_cast<int64_t>(waiting_.front()->request().prompt_ids.size());
    const bool admitted_any = step.size() > decodes;
    if (len > budget_max) {
      // Too long to share a step with anything: it runs alone, as soon as nothing else has been
      // admitted this step. Running decodes yield one step to it, but never two in a row, so
      // a queue of long prompts cannot starve them.
      if (admitted_any) break;
      if (decodes > 0 && last_step_solo_) break;
      step.clear();
      solo = true;
    } else if (len > budget) {
      break;  // FIFO: nothing overtakes the head of the queue
    }
    running->push_back(Seq{waiting_.front(), false, -1, 0});
    waiting_.pop_front();
    step.push_back(running->size() - 1);
    budget -= len;
    if (solo) break;
  }
  last_step_solo_ = solo && decodes > 0;
  running_count_ = static_cast<int64_t>(running->size());
  return step;
}

void Scheduler::FailAll(std::vector<Seq>* running, const Status& error) {
  std::deque<std::shared_ptr<RequestHandle>> waiting;
  {
    std::lock_guard lk(mu_);
    engine_status_ = error;
    waiting.swap(waiting_);
    running_count_ = 0;
  }
  for (auto& s : *running) s.handle->Finish(FinishReason::kError, error);
  for (auto& h : waiting) h->Finish(FinishReason::kError, error);
  running->clear();
}

void Scheduler::Loop() {
  std::vector<Seq> running;
  const int64_t ctx = engine_->config().max_position_embeddings;
  while (true) {
    std::vector<std::shared_ptr<RequestHandle>> cancelled;
    int scale_to = 0;
    bool idle = false;
    {
      std::unique_lock lk(mu_);
      // While idle the engine is still polled now and then, so that a rank failure is
      // recovered (and shown in /v1/cluster) before the next request, and joins complete.
      constexpr auto kIdlePoll = std::chrono::milliseconds(100);
      cv_.wait_for(lk, kIdlePoll, [&] {
        return stopping_ || wake_ || pending_scale_ > 0 ||
               (engine_status_.ok() && (!waiting_.empty() || !running.empty()));
      });
      if (stopping_) break;
      wake_ = false;
      scale_to = std::exchange(pending_scale_, 0);
      idle = waiting_.empty() && running.empty();
      for (auto it = waiting_.begin(); it != waiting_.end();) {
        if ((*it)->cancel_requested()) {
          cancelled.push_back(*it);
          it = waiting_.erase(it);
        } else {
          ++it;
        }
      }
    }
    // Cancelled running sequences leave before the step; their caches go with it.
    for (auto it = running.begin(); it != running.end();) {
      if (it->handle->cancel_requested()) {
        if (it->prefilled) engine_->Release(it->handle->id());
        cancelled.push_back(it->handle);
        it = running.erase(it);
      } else {
        ++it;
      }
    }
    if (!cancelled.empty()) {
      {
        std::lock_guard lk(mu_);
        running_count_ = static_cast<int64_t>(running.size());
      }
      for (auto& h : cancelled) h->Finish(FinishReason::kAborted, Status());
    }
    if (!engine_status_.ok()) {  // failed earlier: only cancellations are served
      std::lock_guard lk(mu_);
      running_count_ = 0;
      continue;
    }
    if (scale_to > 0) {
      Status st = engine_->Scale(scale_to);
      if (!st.ok()) EEP_LOG_WARN("serve: cannot scale to {} rank(s): {}", scale_to, st.ToString());
      {
        std::lock_guard lk(mu_);
        scale_error_ = st.ok() ? "" : st.ToString();
        scale_issued_ = true;
      }
      RefreshSnapshot();
    }
    if (idle) {
      Status st = engine_->Poll();
      if (!st.ok()) {
        EEP_LOG_ERROR("serve: engine failed while idle: {}", st.ToString());
        FailAll(&running, st);
      }
      RefreshSnapshot();
      continue;
    }
    std::vector<size_t> step = Plan(&running);
    if (step.empty()) continue;
    std::vector<ep::SeqInput> inputs;
    inputs.reserve(step.size());
    int64_t prompt_tokens = 0;
    for (size_t i : step) {
      Seq& s = running[i];
      ep::SeqInput in;
      in.seq_id = s.handle->id();
      if (s.prefilled) {
        in.new_ids.assign(1, s.last_token);
      } else {
        in.new_ids = s.handle->request().prompt_ids;
        in.sampling = s.handle->request().sampling;
        prompt_tokens += static_cast<int64_t>(in.new_ids.size());
      }
      inputs.push_back(std::move(in));
    }
    auto outputs = engine_->Step(inputs);
    if (!outputs.ok()) {
      EEP_LOG_ERROR("serve: engine step failed: {}", outputs.status().ToString());
      FailAll(&running, outputs.status());
      RefreshSnapshot();
      continue;
    }
    std::unordered_map<int64_t, int64_t> token_of;
    for (const auto& o : *outputs) token_of[o.seq_id] = o.token;
    // Bookkeeping first, publishing last: a client that has seen its last token finds it
    // counted in the metrics and its sequence released.
    struct Publish {
      std::shared_ptr<RequestHandle> handle;
      int64_t token;  // -1: the engine returned none
      FinishReason finish;
    };
    std::vector<Publish> publish;
    publish.reserve(step.size());
    int64_t generated = 0;
    std::vector<bool> done(running.size(), false);
    for (size_t i : step) {
      Seq& s = running[i];
      auto it = token_of.find(s.handle->id());
      if (it == token_of.end()) {
        // An engine that drops a sequence is broken; fail the request, keep the rest going.
        publish.push_back({s.handle, -1, FinishReason::kError});
        engine_->Release(s.handle->id());
        done[i] = true;
        continue;
      }
      const int64_t token = it->second;
      s.prefilled = true;
      s.last_token = token;
      ++s.generated;
      ++generated;
      const GenerationRequest& r = s.handle->request();
      FinishReason finish = FinishReason::kNone;
      if (std::find(r.stop_token_ids.begin(), r.stop_token_ids.end(), token) !=
          r.stop_token_ids.end())
        finish = FinishReason::kStop;
      else if (s.generated >= r.max_tokens)
        finish = FinishReason::kLength;
      else if (ctx > 0 && static_cast<int64_t>(r.prompt_ids.size()) + s.generated >= ctx)
        finish = FinishReason::kLength;
      publish.push_back({s.handle, token, finish});
      if (finish != FinishReason::kNone) {
        engine_->Release(s.handle->id());
        done[i] = true;
      }
    }
    size_t w = 0;
    for (size_t i = 0; i < running.size(); ++i)
      if (!done[i]) running[w++] = std::move(running[i]);
    running.resize(w);
    {
      std::lock_guard lk(mu_);
      ++steps_;
      prompt_tokens_ += prompt_tokens;
      generation_tokens_ += generated;
      running_count_ = static_cast<int64_t>(running.size());
    }
    RefreshSnapshot();
    for (auto& p : publish) {
      if (p.token < 0)
        p.handle->Finish(FinishReason::kError,
                         Status::Internal(fmt::format("engine returned no token for sequence {}",
                                                      p.handle->id())));
      else
        p.handle->Push(p.token, p.finish, Status());
    }
  }
  // Stopping: the current step has completed; everything left is aborted.
  Status reason;
  std::deque<std::shared_ptr<RequestHandle>> waiting;
  {
    std::lock_guard lk(mu_);
    reason = stop_reason_;
    waiting.swap(waiting_);
    running_count_ = 0;
  }
  for (auto& s : running) {
    if (s.prefilled) engine_->Release(s.handle->id());
    s.handle->Finish(FinishReason::kAborted, reason);
  }
  for (auto& h : waiting) h->Finish(FinishReason::kAborted, reason);
}

}  // namespace eep::serve
