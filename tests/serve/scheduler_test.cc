// The continuous-batching scheduler against a fake engine: token budget, max-num-seqs, FIFO
// admission, decodes every step, stop conditions, cancellation, engine failure.
#include <gtest/gtest.h>

#include <numeric>

#include "fake_step_engine.h"
#include "serve/serve.h"

namespace eep::serve::test {
namespace {

using namespace std::chrono_literals;

struct Outcome {
  std::vector<int64_t> tokens;
  FinishReason finish = FinishReason::kNone;
  Status error;
};

// Collects a request's tokens until it finishes (bounded).
Outcome Collect(const RequestHandle& h, std::chrono::seconds timeout = 20s) {
  Outcome o;
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (o.finish == FinishReason::kNone && std::chrono::steady_clock::now() < deadline) {
    auto p = h.Wait(o.tokens.size(), deadline);
    o.tokens.insert(o.tokens.end(), p.tokens.begin(), p.tokens.end());
    o.finish = p.finish;
    o.error = p.error;
  }
  return o;
}

GenerationRequest Req(int64_t prompt_len, int64_t max_tokens, int64_t first = 1) {
  GenerationRequest r;
  r.prompt_ids.resize(static_cast<size_t>(prompt_len));
  std::iota(r.prompt_ids.begin(), r.prompt_ids.end(), first);
  r.max_tokens = max_tokens;
  return r;
}

TEST(SchedulerTest, RejectsBadOptions) {
  EXPECT_FALSE(ValidateSchedulerOptions({0, 16}).ok());
  EXPECT_FALSE(ValidateSchedulerOptions({8, 4}).ok());
  EXPECT_TRUE(ValidateSchedulerOptions({8, 8}).ok());
}

TEST(SchedulerTest, RespectsTokenBudgetAndMaxNumSeqs) {
  FakeStepEngine engine;
  Scheduler sched(&engine, {/*max_num_seqs=*/4, /*max_num_batched_tokens=*/32});
  // Queued before the thread starts, so the first step's plan is deterministic.
  const std::vector<int64_t> lens{10, 10, 10, 5, 20, 3, 40, 8, 8, 8, 31, 2};
  const std::vector<int64_t> max_tokens{5, 9, 3, 7, 2, 12, 4, 6, 1, 8, 3, 5};
  std::vector<std::shared_ptr<RequestHandle>> handles;
  for (size_t i = 0; i < lens.size(); ++i) {
    auto h = sched.Submit(Req(lens[i], max_tokens[i], static_cast<int64_t>(i * 7 + 1)));
    ASSERT_TRUE(h.ok()) << h.status().ToString();
    handles.push_back(*h);
  }
  ASSERT_TRUE(sched.Start().ok());
  for (size_t i = 0; i < handles.size(); ++i) {
    Outcome o = Collect(*handles[i]);
    ASSERT_EQ(o.finish, FinishReason::kLength) << "request " << i;
    // Batching must not change what a sequence produces.
    EXPECT_EQ(o.tokens, FakeStepEngine::Expected(handles[i]->request().prompt_ids, max_tokens[i]))
        << i;
  }
  const auto steps = engine.steps();
  ASSERT_FALSE(steps.empty());
  // First step: prompts in order while they fit in 32 tokens: 10 + 10 + 10; the next (5) does not.
  EXPECT_EQ(steps[0].seq_ids,
            (std::vector<int64_t>{handles[0]->id(), handles[1]->id(), handles[2]->id()}));
  std::map<int64_t, size_t> first_step;  // seq -> step of its prefill
  std::map<int64_t, size_t> last_step;
  for (size_t s = 0; s < steps.size(); ++s) {
    const auto& st = steps[s];
    EXPECT_LE(st.seq_ids.size(), 4u) << "step " << s;
    if (st.seq_ids.size() > 1) {
      EXPECT_LE(st.total_tokens, 32) << "step " << s;
    }
    // Decodes first, then prefills.
    bool seen_prefill = false;
    for (size_t i = 0; i < st.seq_ids.size(); ++i) {
      if (st.prefill[i]) {
        seen_prefill = true;
        first_step[st.seq_ids[i]] = s;
      } else {
        EXPECT_FALSE(seen_prefill) << "decode after a prefill in step " << s;
      }
      last_step[st.seq_ids[i]] = s;
    }
  }
  // FIFO: prefills in submission order.
  for (size_t i = 1; i < handles.size(); ++i)
    EXPECT_LE(first_step[handles[i - 1]->id()], first_step[handles[i]->id()]) << i;
  // The 40-token prompt (longer than the budget) ran alone.
  const size_t solo = first_step[handles[6]->id()];
  EXPECT_EQ(steps[solo].seq_ids.size(), 1u);
  EXPECT_EQ(steps[solo].total_tokens, 40);
  // Every running sequence decodes in every step until it finishes, except while a solo
  // prefill has the step to itself.
  for (const auto& [seq, first] : first_step) {
    size_t n = 0;
    for (size_t s = first; s <= last_step[seq]; ++s) {
      bool in = std::find(steps[s].seq_ids.begin(), steps[s].seq_ids.end(), seq) !=
                steps[s].seq_ids.end();
      bool solo_step =
          steps[s].seq_ids.size() == 1 && steps[s].prefill[0] && steps[s].seq_ids[0] != seq;
      if (in)
        ++n;
      else
        EXPECT_TRUE(solo_step) << "seq " << seq << " skipped step " << s;
    }
    size_t idx = 0;
    while (handles[idx]->id() != seq) ++idx;
    EXPECT_EQ(n, static_cast<size_t>(max_tokens[idx])) << "seq " << seq;
  }
  // Counters are updated before tokens are published, so they are final now.
  const SchedulerStats stats = sched.Stats();
  EXPECT_EQ(engine.releases(), static_cast<int64_t>(handles.size()));
  EXPECT_EQ(stats.running, 0);
  EXPECT_EQ(stats.waiting, 0);
  EXPECT_EQ(stats.prompt_tokens, std::accumulate(lens.begin(), lens.end(), int64_t{0}));
  EXPECT_EQ(stats.generation_tokens,
            std::accumulate(max_tokens.begin(), max_tokens.end(), int64_t{0}));
  EXPECT_EQ(stats.steps, static_cast<int64_t>(steps.size()));
}

TEST(SchedulerTest, AtMostMaxNumSeqsRun) {
  FakeStepEngine engine;
  Scheduler sched(&engine, {2, 64});
  std::vector<std::shared_ptr<RequestHandle>> hs;
  for (int i = 0; i < 5; ++i) hs.push_back(*sched.Submit(Req(3, 4, i * 10)));
  ASSERT_TRUE(sched.Start().ok());
  for (auto& h : hs) EXPECT_EQ(Collect(*h).finish, FinishReason::kLength);
  for (const auto& st : engine.steps()) EXPECT_LE(st.seq_ids.size(), 2u);
  // 5 requests of 4 tokens, 2 at a time: at least 10 steps.
  EXPECT_GE(engine.steps().size(), 10u);
}

TEST(SchedulerTest, RequestsJoinARunningBatch) {
  FakeStepEngine engine;
  engine.SetGate(0);
  Scheduler sched(&engine, {8, 64});
  ASSERT_TRUE(sched.Start().ok());
  auto a = *sched.Submit(Req(4, 6, 1));
  engine.SetGate(2);  // a: prefill + one decode
  ASSERT_TRUE(engine.WaitSteps(2));
  auto b = *sched.Submit(Req(5, 2, 100));
  engine.SetGate(-1);
  EXPECT_EQ(Collect(*a).tokens, FakeStepEngine::Expected(a->request().prompt_ids, 6));
  EXPECT_EQ(Collect(*b).tokens, FakeStepEngine::Expected(b->request().prompt_ids, 2));
  // b's prefill shares a step with a's decode: the step after b arrived (step 3, or step 4 when
  // the thread had already planned step 3 before b came).
  const auto steps = engine.steps();
  size_t joined = steps.size();
  for (size_t s = 0; s < steps.size(); ++s)
    if (steps[s].seq_ids == std::vector<int64_t>{a->id(), b->id()} &&
        steps[s].prefill == std::vector<bool>{false, true})
      joined = s;
  EXPECT_TRUE(joined == 2 || joined == 3) << joined;
}

TEST(SchedulerTest, StopTokensEndTheSequence) {
  FakeStepEngine engine;
  Scheduler sched(&engine, {4, 64});
  GenerationRequest r = Req(6, 50);
  const auto expected = FakeStepEngine::Expected(r.prompt_ids, 50);
  r.stop_token_ids = {expected[3]};
  auto h = *sched.Submit(r);
  ASSERT_TRUE(sched.Start().ok());
  Outcome o = Collect(*h);
  EXPECT_EQ(o.finish, FinishReason::kStop);
  const auto stop_at = std::find(expected.begin(), expected.end(), expected[3]) - expected.begin();
  EXPECT_EQ(o.tokens, std::vector<int64_t>(expected.begin(), expected.begin() + stop_at + 1));
}

TEST(SchedulerTest, ContextLimit) {
  FakeStepEngine engine(/*max_position=*/16);
  Scheduler sched(&engine, {4, 64});
  EXPECT_EQ(sched.Submit(Req(10, 7)).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(sched.Submit(Req(0, 1)).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(sched.Submit(Req(3, 0)).status().code(), StatusCode::kInvalidArgument);
  auto h = sched.Submit(Req(10, 6));
  ASSERT_TRUE(h.ok());
  ASSERT_TRUE(sched.Start().ok());
  Outcome o = Collect(**h);
  EXPECT_EQ(o.finish, FinishReason::kLength);
  EXPECT_EQ(o.tokens.size(), 6u);
}

TEST(SchedulerTest, CancelReleasesTheSequence) {
  FakeStepEngine engine;
  engine.SetGate(0);
  Scheduler sched(&engine, {4, 64});
  ASSERT_TRUE(sched.Start().ok());
  auto running = *sched.Submit(Req(4, 1000));
  auto queued_behind = *sched.Submit(Req(4, 3, 50));
  engine.SetGate(3);
  ASSERT_TRUE(engine.WaitSteps(3));
  running->Cancel(Status::Cancelled("client disconnected"));
  engine.SetGate(-1);
  Outcome o = Collect(*running);
  EXPECT_EQ(o.finish, FinishReason::kAborted);
  EXPECT_EQ(o.error.code(), StatusCode::kCancelled);
  EXPECT_LT(o.tokens.size(), 1000u);
  EXPECT_EQ(Collect(*queued_behind).finish, FinishReason::kLength);
  EXPECT_EQ(engine.releases(), 2);
}

TEST(SchedulerTest, CancelWhileWaitingNeverReachesTheEngine) {
  FakeStepEngine engine;
  engine.SetGate(0);
  Scheduler sched(&engine, {1, 64});  // one at a time: the second request has to wait
  ASSERT_TRUE(sched.Start().ok());
  auto blocker = *sched.Submit(Req(2, 5, 7));
  auto waiting = *sched.Submit(Req(2, 5, 9));
  waiting->Cancel(Status::Cancelled("client disconnected"));
  engine.SetGate(-1);
  EXPECT_EQ(Collect(*waiting).finish, FinishReason::kAborted);
  EXPECT_EQ(Collect(*blocker).finish, FinishReason::kLength);
  for (const auto& st : engine.steps())
    EXPECT_EQ(std::count(st.seq_ids.begin(), st.seq_ids.end(), waiting->id()), 0);
}

TEST(SchedulerTest, EngineFailureFailsRequestsAndRefusesNewOnes) {
  FakeStepEngine engine;
  engine.FailAtStep(2);
  Scheduler sched(&engine, {4, 64});
  auto a = *sched.Submit(Req(3, 10));
  ASSERT_TRUE(sched.Start().ok());
  Outcome o = Collect(*a);
  EXPECT_EQ(o.finish, FinishReason::kError);
  EXPECT_EQ(o.tokens.size(), 2u);
  EXPECT_NE(o.error.message().find("rank 1"), std::string::npos);
  EXPECT_EQ(sched.Submit(Req(3, 1)).status().code(), StatusCode::kUnavailable);
  EXPECT_FALSE(sched.Stats().engine_status.ok());
}

TEST(SchedulerTest, StopAbortsEverything) {
  FakeStepEngine engine;
  engine.SetGate(1);
  Scheduler sched(&engine, {1, 64});
  auto a = *sched.Submit(Req(3, 100));
  auto b = *sched.Submit(Req(3, 100));
  ASSERT_TRUE(sched.Start().ok());
  ASSERT_TRUE(engine.WaitSteps(1));
  // The step thread is parked in the gate of step 2. Stop (on another thread) waits for that
  // step; the gate opens once the stop is in effect, which Submit reports.
  std::thread stopper([&] { sched.Stop(Status::Unavailable("test stop")); });
  const auto deadline = std::chrono::steady_clock::now() + 20s;
  while (sched.Submit(Req(3, 1)).ok() && std::chrono::steady_clock::now() < deadline)
    std::this_thread::yield();
  engine.SetGate(-1);
  stopper.join();
  EXPECT_EQ(Collect(*a).finish, FinishReason::kAborted);
  Outcome ob = Collect(*b);
  EXPECT_EQ(ob.finish, FinishReason::kAborted);
  EXPECT_EQ(ob.error.message(), "test stop");
  EXPECT_EQ(sched.Submit(Req(3, 1)).status().code(), StatusCode::kUnavailable);
}

}  // namespace
}  // namespace eep::serve::test
