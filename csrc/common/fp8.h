// FP8 E4M3 (torch.float8_e4m3fn) block quantisation, shared by the CPU and CUDA kernels.
//
// Format: 1 sign, 4 exponent (bias 7), 3 mantissa bits; max normal 448 (0x7E), smallest normal
// 2^-6, denormals m * 2^-9; no infinities; NaN = 0x7F / 0xFF.
//
// Quantisation of a row: one fp32 scale per block of kBlock = 128 channels (the last block of a row
// may be shorter), q = e4m3(x / scale). The rules, identical in the pure-PyTorch reference:
//   * amax = max |x| over the block, taken on the bit patterns (so denormal inputs count exactly);
//   * a block holding a NaN or an Inf is "non-finite": scale = NaN (0x7FC00000) and every byte is
//     0x7F (NaN), so it dequantises to NaN everywhere and a diverging run stays visibly diverged;
//   * otherwise scale = amax / 448 (fp32, round to nearest); if that is 0 (an all-zero block, or
//     amax < 448 * 2^-150 so the division underflows) scale = 1 and the bytes are signed zeros;
//   * x / scale is rounded to nearest even into E4M3, keeping the sign of zero, with E4M3 denormals,
//     and saturated to +-448 (it can exceed 448 only through the rounding of the scale);
//   * no flush to zero anywhere: fp32 denormal inputs and denormal scales are exact IEEE values.
#pragma once
#include <cstdint>

#include "common/numerics.h"

namespace moe_train {

constexpr int kBlock = 128;                  // channels per scale
constexpr float kE4M3Max = 448.0f;           // largest finite E4M3 value
constexpr uint32_t kE4M3MaxBits = 0x43E00000u;  // bits of 448.0f
constexpr uint32_t kInfBits = 0x7F800000u;
constexpr uint32_t kCanonicalNaNBits = 0x7FC00000u;
constexpr uint8_t kE4M3NaN = 0x7F;

// Round-to-nearest-even conversion of a float with saturation to +-448; NaN -> 0x7F. Branch-free (the
// CPU loops vectorise): E4M3 normals drop 20 mantissa bits with an integer round-half-even and rebias the
// exponent (127 -> 7); E4M3 denormals (|f| < 2^-6) come from adding 2^14, whose fp32 ulp is the E4M3
// denormal step 2^-9, so the float addition rounds |f| to a multiple of it (m = 8 is the smallest normal).
MOE_HD inline uint8_t float_to_e4m3(float f) {
  const uint32_t u = float_bits(f);
  const uint32_t sign = (u >> 24) & 0x80u;
  const uint32_t a = u & 0x7FFFFFFFu;
  const uint32_t normal = (a - (120u << 23) + 0x7FFFFu + ((a >> 20) & 1u)) >> 20;
  const uint32_t denormal = float_bits(add_rn(bits_float(a), 16384.0f)) - 0x46800000u;  // 0x46800000 = 2^14
  uint32_t r = a < 0x3C800000u ? denormal : normal;                                     // 0x3C800000 = 2^-6
  r = a >= kE4M3MaxBits ? 0x7Eu : r;                                                    // saturate (also Inf)
  r |= sign;
  r = a > kInfBits ? static_cast<uint32_t>(kE4M3NaN) : r;
  return static_cast<uint8_t>(r);
}

// Exact E4M3 -> float (NaN -> the canonical quiet NaN).
MOE_HD inline float e4m3_to_float(uint8_t b) {
  const uint32_t sign = static_cast<uint32_t>(b & 0x80u) << 24;
  const uint32_t e = (b >> 3) & 0xFu, m = b & 7u;
  if (e == 15u && m == 7u) return bits_float(kCanonicalNaNBits);
  if (e == 0u) return bits_float(sign | float_bits(static_cast<float>(m) * 0.001953125f));  // m * 2^-9
  return bits_float(sign | ((e + 120u) << 23) | (m << 20));
}

// Running block amax on bit patterns: max over |x| bits orders non-negative floats by value, and
// any NaN/Inf shows as a result >= kInfBits.
MOE_HD inline uint32_t amax_bits_update(uint32_t amax_bits, float x) {
  const uint32_t a = float_bits(x) & 0x7FFFFFFFu;
  return a > amax_bits ? a : amax_bits;
}

// The block scale for a block amax (see the rules at the top).
MOE_HD inline float block_scale(uint32_t amax_bits) {
  if (amax_bits >= kInfBits) return bits_float(kCanonicalNaNBits);
  const float s = div_rn(bits_float(amax_bits), kE4M3Max);
  return s == 0.0f ? 1.0f : s;
}

// One element of a block with scale `scale` (NaN scale = non-finite block).
MOE_HD inline uint8_t quantize_e4m3(float x, float scale) {
  if (scale != scale) return kE4M3NaN;
  return float_to_e4m3(div_rn(x, scale));
}

// q * scale; any NaN result is the canonical quiet NaN (so CPU and GPU agree bit for bit).
MOE_HD inline float dequantize_e4m3(uint8_t q, float scale) {
  const float v = mul_rn(e4m3_to_float(q), scale);
  return v != v ? bits_float(kCanonicalNaNBits) : v;
}

MOE_HD inline int64_t num_blocks(int64_t hidden) { return (hidden + kBlock - 1) / kBlock; }

}  // namespace moe_train
