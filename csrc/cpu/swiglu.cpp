// CPU SwiGLU activation of the experts (and the dense MLP): h = silu(gate) * up in one pass, and its
// backward (d_gate, d_up) in one pass over (d_h, gate, up), so neither silu(gate) nor any other
// [N, F] intermediate is written or kept for backward. fp32 only.
//
// The loops are plain C++ that the compiler vectorises; target_clones builds an AVX-512, an AVX2 and a
// baseline copy and picks one at load time. exp is a Cephes-style polynomial (below) rather than libm's,
// so it vectorises without -ffast-math. Every clone does the same IEEE operations in the same order
// (no FMA contraction: -ffp-contract=off), so an element's value does not depend on the clone, the
// thread split or its position in the tensor.
#include <torch/extension.h>

#include <cstdint>
#include <cstring>
#include <tuple>

namespace moe_train {
namespace {

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define MOE_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MOE_SIMD_CLONES
#endif

// Below this many elements one thread is faster than waking a team.
constexpr int64_t kParallelElems = int64_t{1} << 16;

// exp(x) for x in [-87, 88] (clamped), relative error ~2 ulp: x = n ln2 + r with |r| <= ln2 / 2,
// e^r by a degree-7 polynomial, 2^n by building the float's exponent bits. NaN stays NaN.
inline float exp_clamped(float x) {
  const float xc = x > 88.0f ? 88.0f : (x < -87.0f ? -87.0f : x);
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  const float n = (xc * 1.44269504088896341f + shifter) - shifter;
  const float r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;  // ln2 split in two for exactness
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float er = (p * r) * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const float y = er * scale;
  return x != x ? x : y;  // NaN in, NaN out
}

// sigmoid(g) = 1 / (1 + exp(-g)).
inline float sigmoid(float g) { return 1.0f / (1.0f + exp_clamped(-g)); }

MOE_SIMD_CLONES
void swiglu_forward_range(const float* gate, const float* up, float* out, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) out[i] = (gate[i] * sigmoid(gate[i])) * up[i];
}

// d_up = d_h * silu(g);  d_gate = d_h * up * s * (1 + g * (1 - s)) with s = sigmoid(g).
MOE_SIMD_CLONES
void swiglu_backward_range(const float* grad, const float* gate, const float* up, float* grad_gate, float* grad_up,
                           int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    const float g = gate[i];
    const float s = sigmoid(g);
    grad_up[i] = grad[i] * (g * s);
    grad_gate[i] = ((grad[i] * up[i]) * s) * (1.0f + g * (1.0f - s));
  }
}

// Runs fn(begin, end) over [0, n) in chunks, across OpenMP threads when n is large.
template <typename Fn>
void parallel_chunks(int64_t n, Fn&& fn) {
  constexpr int64_t kChunkElems = 1 << 14;
  const int64_t chunks = (n + kChunkElems - 1) / kChunkElems;
#pragma omp parallel for schedule(static) if (n >= kParallelElems)
  for (int64_t c = 0; c < chunks; ++c) fn(c * kChunkElems, std::min(n, (c + 1) * kChunkElems));
}

void check_operand(const torch::Tensor& x, const torch::Tensor& like, const char* op, const char* name) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat, op, ": ", name, " must be float32, got ", x.scalar_type());
  TORCH_CHECK(x.device().is_cpu(), op, ": CPU tensors only, got ", name, " on ", x.device());
  TORCH_CHECK(x.sizes() == like.sizes(), op, ": ", name, " shape ", x.sizes(), " != gate shape ", like.sizes());
}

}  // namespace

torch::Tensor swiglu_forward_cpu(const torch::Tensor& gate, const torch::Tensor& up) {
  const char* op = "swiglu";
  check_operand(gate, gate, op, "gate");
  check_operand(up, gate, op, "up");
  auto g = gate.contiguous();
  auto u = up.contiguous();
  auto out = torch::empty_like(g);
  const float* gp = g.data_ptr<float>();
  const float* upp = u.data_ptr<float>();
  float* op_ = out.data_ptr<float>();
  parallel_chunks(g.numel(), [&](int64_t b, int64_t e) { swiglu_forward_range(gp, upp, op_, b, e); });
  return out;
}

std::tuple<torch::Tensor, torch::Tensor> swiglu_backward_cpu(const torch::Tensor& grad, const torch::Tensor& gate,
                                                             const torch::Tensor& up) {
  const char* op = "swiglu_backward";
  check_operand(gate, gate, op, "gate");
  check_operand(up, gate, op, "up");
  check_operand(grad, gate, op, "grad");
  auto d = grad.contiguous();
  auto g = gate.contiguous();
  auto u = up.contiguous();
  auto grad_gate = torch::empty_like(g);
  auto grad_up = torch::empty_like(g);
  const float* dp = d.data_ptr<float>();
  const float* gp = g.data_ptr<float>();
  const float* upp = u.data_ptr<float>();
  float* dg = grad_gate.data_ptr<float>();
  float* du = grad_up.data_ptr<float>();
  parallel_chunks(g.numel(), [&](int64_t b, int64_t e) { swiglu_backward_range(dp, gp, upp, dg, du, b, e); });
  return {grad_gate, grad_up};
}

}  // namespace moe_train
