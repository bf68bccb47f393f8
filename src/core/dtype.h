// Element types of checkpoint tensors and their conversion to f32 (compute type on CPU).
#pragma once

#include <cstdint>
#include <cstring>
#include <string>

#include "core/status.h"

namespace eep {

enum class DType { kF32, kF16, kBF16, kF64, kI64, kI32, kU8, kF8E4M3 };

// Bytes per element.
size_t DTypeSize(DType dtype);
// safetensors spelling: "F32", "BF16", ...
const char* DTypeName(DType dtype);
Result<DType> ParseDType(const std::string& name);

inline float BF16ToF32(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Round-to-nearest-even, NaN kept quiet.
inline uint16_t F32ToBF16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  uint32_t rounding = 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>((bits + rounding) >> 16);
}

float F16ToF32(uint16_t h);
uint16_t F32ToF16(float f);

// Converts n elements of `src` (dtype) into f32. Supports F32, F16, BF16, F64.
Status ConvertToF32(DType dtype, const void* src, size_t n, float* dst);

}  // namespace eep
