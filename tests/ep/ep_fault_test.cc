// `eep generate --inject-fault` end to end: a rank that is killed, hangs, or is slow mid-run
// is detected within a bounded time, named in the log, and the command still prints the
// tokens of a run without the fault. (Recovery details are tested in ep_failover_test.cc.)
#include <gtest/gtest.h>

#include <chrono>
#include <fmt/format.h>

#include "test_util.h"

namespace eep {
namespace {

class EpFault : public ::testing::TestWithParam<std::tuple<std::string, std::string>> {};

TEST_P(EpFault, FaultyRankIsNamedAndOutputUnchanged) {
  const std::string base = fmt::format("generate --model {} --prompt-ids 1,2,3 --max-new-tokens 8 --ep 3 --peer-timeout-ms 500 "
                                       "--ep-communicator {} --json",
                                       test::ModelDir("qwen3moe-tiny"), std::get<1>(GetParam()));
  auto ref = test::RunEep(base + " --log-level error");
  ASSERT_EQ(ref.exit_code, 0) << ref.err;
  const auto t0 = std::chrono::steady_clock::now();
  auto r = test::RunEep(base + fmt::format(" --inject-fault rank=1,after-steps=2,mode={} --log-level info", std::get<0>(GetParam())));
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, ref.out);
  if (std::get<0>(GetParam()) == "slow") {
    // Slow is not dead: peers report it, everyone waits, nobody is fenced.
    EXPECT_NE(r.err.find("rank 1 silent"), std::string::npos) << r.err;
    EXPECT_EQ(r.err.find("ep: failover"), std::string::npos) << r.err;
  } else {
    // The recovery line names the dead rank.
    EXPECT_NE(r.err.find("ep: failover"), std::string::npos) << r.err;
    const bool named = r.err.find("rank 1 exited") != std::string::npos || r.err.find("rank 1 is stopped") != std::string::npos ||
                       r.err.find("rank 1 sent no heartbeat") != std::string::npos;
    EXPECT_TRUE(named) << r.err;
  }
  EXPECT_LT(seconds, 20.0);
}

INSTANTIATE_TEST_SUITE_P(Modes, EpFault,
                         ::testing::Combine(::testing::Values("kill", "hang", "slow"), ::testing::Values("shm", "ucx")),
                         [](const auto& info) { return std::get<0>(info.param) + "_" + std::get<1>(info.param); });

TEST(EpFaultFlags, BadSpecIsRefused) {
  auto r = test::RunEep(fmt::format("generate --model {} --prompt-ids 1 --max-new-tokens 1 --ep 2 --inject-fault rank=5,mode=kill",
                                    test::ModelDir("qwen3moe-tiny")));
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("--inject-fault"), std::string::npos) << r.err;
  r = test::RunEep(fmt::format("generate --model {} --prompt-ids 1 --max-new-tokens 1 --ep 2 --inject-fault rank=1,mode=melt",
                               test::ModelDir("qwen3moe-tiny")));
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("mode"), std::string::npos) << r.err;
  r = test::RunEep(fmt::format("generate --model {} --prompt-ids 1 --max-new-tokens 1 --ep 2 --ep-communicator carrier-pigeon",
                               test::ModelDir("qwen3moe-tiny")));
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("carrier-pigeon"), std::string::npos) << r.err;
}

}  // namespace
}  // namespace eep
