// Shared by the GPU tests: skip (clearly, naming why) where no CUDA device is usable.
#pragma once

#include <gtest/gtest.h>

#include "cuda/cuda_model.h"

// In a TEST body: skips the test with "no CUDA device (...): GPU <what> test skipped".
#define EEP_REQUIRE_GPU(what)                                                                   \
  do {                                                                                          \
    if (!::eep::cuda::Available())                                                              \
      GTEST_SKIP() << "no CUDA device (" << ::eep::cuda::DeviceDescription() << "): GPU " what \
                   << " test skipped";                                                          \
  } while (0)
