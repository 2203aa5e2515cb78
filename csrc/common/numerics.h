// Scalar numerics shared by the CPU and CUDA kernels: bit casts, IEEE round-to-nearest float ops that
// the compiler may not contract into FMAs, and bf16 <-> fp32 conversion identical to torch's.
//
// Every function here is __host__ __device__, so the CPU tests exercise the code the GPU runs.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define MOE_HD __host__ __device__
#else
#define MOE_HD
#endif

namespace moe_train {

MOE_HD inline uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

MOE_HD inline float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

// a * b and a + b rounded to nearest even, never fused with a neighbouring op (the CPU build uses
// -ffp-contract=off, the device build the _rn intrinsics), so both paths round identically.
MOE_HD inline float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

MOE_HD inline float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

MOE_HD inline float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

// bf16 stored as its 16-bit pattern.
MOE_HD inline float bf16_to_float(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

// Round to nearest even; every NaN becomes 0x7FC0 (what c10::BFloat16 does).
MOE_HD inline uint16_t float_to_bf16(float f) {
  const uint32_t u = float_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0u;
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// Element types the kernels move: fp32 and bf16 (as uint16_t bit patterns).
template <typename T>
struct Elem;

// store() of a computed value writes any NaN as the canonical quiet NaN (0x7FC00000 / 0x7FC0), so
// that the CPU (which propagates NaN payloads) and the GPU (which does not) agree bit for bit.
template <>
struct Elem<float> {
  MOE_HD static float load(float v) { return v; }
  MOE_HD static float store(float f) { return f != f ? bits_float(0x7FC00000u) : f; }
};

template <>
struct Elem<uint16_t> {
  MOE_HD static float load(uint16_t v) { return bf16_to_float(v); }
  MOE_HD static uint16_t store(float f) { return float_to_bf16(f); }
};

}  // namespace moe_train
