// A rank that stops answering (killed, hung, or too slow) becomes a clear error naming it,
// within a bounded time — never a hang. (Recovery from it is the [fault] work.)
#include <gtest/gtest.h>

#include <chrono>
#include <fmt/format.h>

#include "test_util.h"

namespace eep {
namespace {

class EpFault : public ::testing::TestWithParam<std::tuple<std::string, std::string>> {};

TEST_P(EpFault, SilentRankIsNamedWithinDeadline) {
  const auto t0 = std::chrono::steady_clock::now();
  auto r = test::RunEep(fmt::format(
      "generate --model {} --prompt-ids 1,2,3 --max-new-tokens 8 --ep 3 --peer-timeout-ms 500 "
      "--inject-fault rank=1,after-steps=2,mode={} --ep-communicator {} --log-level error",
      test::ModelDir("qwen3moe-tiny"), std::get<0>(GetParam()), std::get<1>(GetParam())));
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_NE(r.exit_code, 0);
  // The last line is the command's error; it names rank 1 as the silent peer.
  std::string err = r.err;
  while (!err.empty() && err.back() == '\n') err.pop_back();
  const std::string last = err.substr(err.rfind('\n') == std::string::npos ? 0 : err.rfind('\n') + 1);
  EXPECT_TRUE(last.find("rank(s) 1 ") != std::string::npos || last.find("rank 1 exited") != std::string::npos ||
              last.find("to rank 1 failed") != std::string::npos)
      << last;
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
