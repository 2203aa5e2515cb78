// CPU token dispatch kernels (OpenMP): row map, permute (+ FP8 quantise, + probs scaling), unpermute
// with the weighted combine, its backward, and FP8 dequantise. The per-element math and the row-map
// indexing come from csrc/common/, the same code the CUDA kernels run.
//
// Legend: T tokens, H hidden, K choices per token, E experts, R dispatched rows, G = ceil(H / 128)
// scale blocks per row, A = T*K assignments, C chunks of assignments.
#include <torch/extension.h>

#include <cstring>
#include <tuple>
#include <vector>

#include "checks.h"
#include "common/fp8.h"
#include "common/row_map.h"

namespace moe_train {
namespace {

// The row map is a few integer passes over A assignments: below this many chunks one thread is faster
// than waking a team (and, on a loaded machine, than waiting for a descheduled one at the barrier).
constexpr int64_t kParallelChunks = 4096;

// Phase 1: per-chunk histograms hist[e][c] of kept assignments.
void chunk_histograms(const int64_t* expert_A, int64_t A, int64_t E, int64_t C, int64_t* hist_EC) {
#pragma omp parallel if (C >= kParallelChunks)
  {
    std::vector<int64_t> cnt(E);
#pragma omp for schedule(static)
    for (int64_t c = 0; c < C; ++c) {
      std::fill(cnt.begin(), cnt.end(), 0);
      const int64_t end = std::min(A, (c + 1) * kChunk);
      for (int64_t i = c * kChunk; i < end; ++i) {
        if (expert_status(expert_A[i], E) == 0) ++cnt[expert_A[i]];
      }
      for (int64_t e = 0; e < E; ++e) hist_EC[hist_index(e, c, C)] = cnt[e];
    }
  }
}

// Phases 2 and 3: hist becomes each chunk's exclusive base within its expert; counts and offsets.
void scan_histograms(int64_t* hist_EC, int64_t E, int64_t C, int64_t* counts_E, int64_t* offsets_E) {
#pragma omp parallel for schedule(static) if (C >= kParallelChunks)
  for (int64_t e = 0; e < E; ++e) {
    int64_t run = 0;
    for (int64_t c = 0; c < C; ++c) {
      const int64_t v = hist_EC[hist_index(e, c, C)];
      hist_EC[hist_index(e, c, C)] = run;
      run += v;
    }
    counts_E[e] = run;
  }
  int64_t run = 0;
  for (int64_t e = 0; e < E; ++e) {
    offsets_E[e] = run;
    run += counts_E[e];
  }
}

// Phase 4: the row of every assignment.
void assign_rows(const int64_t* expert_A, int64_t A, int64_t E, int64_t C, const int64_t* base_EC,
                 const int64_t* offsets_E, int64_t* row_map_A) {
#pragma omp parallel if (C >= kParallelChunks)
  {
    std::vector<int64_t> rank(E);
#pragma omp for schedule(static)
    for (int64_t c = 0; c < C; ++c) {
      std::fill(rank.begin(), rank.end(), 0);
      const int64_t end = std::min(A, (c + 1) * kChunk);
      for (int64_t i = c * kChunk; i < end; ++i) {
        const int64_t e = expert_A[i];
        row_map_A[i] = expert_status(e, E) == 0 ? row_of(offsets_E[e], base_EC[hist_index(e, c, C)], rank[e]++) : -1;
      }
    }
  }
}

template <typename T>
void permute_kernel(const T* x_TH, const int64_t* row_map_TK, const float* probs_TK, int64_t T_, int64_t K,
                    int64_t H, T* rows_RH) {
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < T_; ++t) {
    const T* src = x_TH + t * H;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t r = row_map_TK[t * K + k];
      if (r < 0) continue;
      T* dst = rows_RH + r * H;
      if (probs_TK == nullptr) {
        std::memcpy(dst, src, H * sizeof(T));
      } else {
        const float p = probs_TK[t * K + k];
        for (int64_t h = 0; h < H; ++h) dst[h] = Elem<T>::store(mul_rn(p, Elem<T>::load(src[h])));
      }
    }
  }
}

template <typename T>
void permute_fp8_kernel(const T* x_TH, const int64_t* row_map_TK, int64_t T_, int64_t K, int64_t H, uint8_t* rows_RH,
                        float* scales_RG) {
  const int64_t G = num_blocks(H);
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < T_; ++t) {
    const T* src = x_TH + t * H;
    uint8_t q[kBlock];
    for (int64_t g = 0; g < G; ++g) {
      const int64_t h0 = g * kBlock, n = std::min<int64_t>(kBlock, H - h0);
      uint32_t amax = 0;
      for (int64_t i = 0; i < n; ++i) amax = amax_bits_update(amax, Elem<T>::load(src[h0 + i]));
      const float s = block_scale(amax);
      if (s != s) {  // non-finite block: all NaN (quantize_e4m3's rule, hoisted out of the loop)
        std::memset(q, kE4M3NaN, n);
      } else {
        for (int64_t i = 0; i < n; ++i) q[i] = float_to_e4m3(div_rn(Elem<T>::load(src[h0 + i]), s));
      }
      for (int64_t k = 0; k < K; ++k) {
        const int64_t r = row_map_TK[t * K + k];
        if (r < 0) continue;
        std::memcpy(rows_RH + r * H + h0, q, n);
        scales_RG[r * G + g] = s;
      }
    }
  }
}

template <typename T>
void unpermute_kernel(const T* rows_RH, const int64_t* row_map_TK, const float* probs_TK, int64_t T_, int64_t K,
                      int64_t H, T* out_TH) {
#pragma omp parallel
  {
    std::vector<float> acc(H);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T_; ++t) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      const int64_t* map = row_map_TK + t * K;
      for (int k = next_row(map, K, -1); k >= 0; k = next_row(map, K, map[k])) {
        const T* src = rows_RH + map[k] * H;
        if (probs_TK == nullptr) {
          for (int64_t h = 0; h < H; ++h) acc[h] = add_rn(acc[h], Elem<T>::load(src[h]));
        } else {
          const float p = probs_TK[t * K + k];
          for (int64_t h = 0; h < H; ++h) acc[h] = add_rn(acc[h], mul_rn(p, Elem<T>::load(src[h])));
        }
      }
      T* dst = out_TH + t * H;
      for (int64_t h = 0; h < H; ++h) dst[h] = Elem<T>::store(acc[h]);
    }
  }
}

constexpr int64_t kDotLanes = 8;

template <typename T>
void unpermute_backward_kernel(const T* grad_TH, const T* rows_RH, const int64_t* row_map_TK, const float* probs_TK,
                               int64_t T_, int64_t K, int64_t H, T* grad_rows_RH, float* grad_probs_TK) {
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < T_; ++t) {
    const T* g = grad_TH + t * H;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t r = row_map_TK[t * K + k];
      if (r < 0) {
        grad_probs_TK[t * K + k] = 0.0f;
        continue;
      }
      const float p = probs_TK[t * K + k];
      const T* x = rows_RH + r * H;
      T* dst = grad_rows_RH + r * H;
      // <grad, row> in kDotLanes independent fp64 partial sums: one running sum would chain every
      // add on the previous one's latency (it made this kernel 5x slower than the forward).
      double lanes[kDotLanes] = {};
      int64_t h = 0;
      for (; h + kDotLanes <= H; h += kDotLanes) {
        for (int64_t j = 0; j < kDotLanes; ++j) {
          const float gh = Elem<T>::load(g[h + j]);
          lanes[j] += static_cast<double>(gh) * static_cast<double>(Elem<T>::load(x[h + j]));
          dst[h + j] = Elem<T>::store(mul_rn(p, gh));
        }
      }
      for (; h < H; ++h) {
        const float gh = Elem<T>::load(g[h]);
        lanes[0] += static_cast<double>(gh) * static_cast<double>(Elem<T>::load(x[h]));
        dst[h] = Elem<T>::store(mul_rn(p, gh));
      }
      double dot = 0.0;
      for (int64_t j = 0; j < kDotLanes; ++j) dot += lanes[j];
      grad_probs_TK[t * K + k] = static_cast<float>(dot);
    }
  }
}

template <typename T>
void dequantize_kernel(const uint8_t* q_RH, const float* scales_RG, int64_t R, int64_t H, T* out_RH) {
  const int64_t G = num_blocks(H);
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t h = 0; h < H; ++h) {
      out_RH[r * H + h] = Elem<T>::store(dequantize_e4m3(q_RH[r * H + h], scales_RG[r * G + h / kBlock]));
    }
  }
}

// Row-map entries must be -1 or a row of `rows`.
void check_rows_in_range(const torch::Tensor& row_map, int64_t rows, const char* op) {
  const int64_t* m = row_map.data_ptr<int64_t>();
  for (int64_t i = 0; i < row_map.numel(); ++i) {
    TORCH_CHECK(m[i] >= -1 && m[i] < rows, op, ": row_map entry ", m[i], " out of range [-1, ", rows, ")");
  }
}

void check_cpu(const torch::Tensor& x, const char* op) {
  TORCH_CHECK(x.device().is_cpu(), op, ": CPU tensors only, got one on ", x.device());
}

// Pointer to a tensor's elements as the kernels' element type (bf16 as uint16_t).
template <typename T>
T* elems(const torch::Tensor& x) {
  return reinterpret_cast<T*>(x.data_ptr());
}

// Run f.template operator()<T>() with T = float or uint16_t (bf16) for x's dtype.
template <typename F>
void dispatch_elem(const torch::Tensor& x, F&& f) {
  if (is_bf16(x)) {
    f(uint16_t{});
  } else {
    f(float{});
  }
}

}  // namespace

std::tuple<torch::Tensor, torch::Tensor> build_row_map_cpu(const torch::Tensor& topk_idx_TK, int64_t num_experts) {
  TORCH_CHECK(topk_idx_TK.dim() == 2 && topk_idx_TK.scalar_type() == torch::kLong,
              "build_row_map: topk_idx must be a 2-D int64 tensor [tokens, top_k]");
  TORCH_CHECK(num_experts > 0, "build_row_map: num_experts (", num_experts, ") must be > 0");
  check_cpu(topk_idx_TK, "build_row_map");
  auto idx = topk_idx_TK.contiguous();
  const int64_t A = idx.numel(), C = num_chunks(A), E = num_experts;
  const int64_t* expert_A = idx.data_ptr<int64_t>();
  for (int64_t i = 0; i < A; ++i) {
    TORCH_CHECK(expert_status(expert_A[i], E) != 2, "build_row_map: expert id ", expert_A[i],
                " out of range [-1, ", E, ")");
  }
  auto row_map = torch::empty_like(idx);
  auto counts = torch::empty({E}, idx.options());
  auto offsets = torch::empty({E}, idx.options());
  auto hist = torch::empty({E * C}, idx.options());
  chunk_histograms(expert_A, A, E, C, hist.data_ptr<int64_t>());
  scan_histograms(hist.data_ptr<int64_t>(), E, C, counts.data_ptr<int64_t>(), offsets.data_ptr<int64_t>());
  assign_rows(expert_A, A, E, C, hist.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(), row_map.data_ptr<int64_t>());
  return {row_map, counts};
}

torch::Tensor permute_cpu(const torch::Tensor& x_TH, const torch::Tensor& row_map_TK, int64_t num_rows,
                          const c10::optional<torch::Tensor>& probs_TK) {
  const char* op = "permute";
  check_2d(x_TH, op, "tokens");
  check_rows_dtype(x_TH, op, "tokens");
  check_row_map(row_map_TK, x_TH.size(0), op);
  check_cpu(x_TH, op);
  check_cpu(row_map_TK, op);
  auto x = x_TH.contiguous();
  auto map = row_map_TK.contiguous();
  check_rows_in_range(map, num_rows, op);
  torch::Tensor probs;
  if (probs_TK.has_value()) {
    check_probs(*probs_TK, map, op);
    check_cpu(*probs_TK, op);
    probs = probs_TK->contiguous();
  }
  auto out = torch::empty({num_rows, x.size(1)}, x.options());
  const float* p = probs.defined() ? probs.data_ptr<float>() : nullptr;
  dispatch_elem(x, [&](auto tag) {
    using T = decltype(tag);
    permute_kernel<T>(elems<T>(x), map.data_ptr<int64_t>(), p, x.size(0), map.size(1), x.size(1), elems<T>(out));
  });
  return out;
}

std::tuple<torch::Tensor, torch::Tensor> permute_fp8_cpu(const torch::Tensor& x_TH, const torch::Tensor& row_map_TK,
                                                         int64_t num_rows) {
  const char* op = "permute_fp8";
  check_2d(x_TH, op, "tokens");
  check_rows_dtype(x_TH, op, "tokens");
  check_row_map(row_map_TK, x_TH.size(0), op);
  check_cpu(x_TH, op);
  check_cpu(row_map_TK, op);
  auto x = x_TH.contiguous();
  auto map = row_map_TK.contiguous();
  check_rows_in_range(map, num_rows, op);
  const int64_t H = x.size(1);
  auto rows = torch::empty({num_rows, H}, x.options().dtype(torch::kFloat8_e4m3fn));
  auto scales = torch::empty({num_rows, num_blocks(H)}, x.options().dtype(torch::kFloat));
  dispatch_elem(x, [&](auto tag) {
    using T = decltype(tag);
    permute_fp8_kernel<T>(elems<T>(x), map.data_ptr<int64_t>(), x.size(0), map.size(1), H,
                          reinterpret_cast<uint8_t*>(rows.data_ptr()), scales.data_ptr<float>());
  });
  return {rows, scales};
}

torch::Tensor unpermute_cpu(const torch::Tensor& rows_RH, const torch::Tensor& row_map_TK,
                            const c10::optional<torch::Tensor>& probs_TK) {
  const char* op = "unpermute";
  check_2d(rows_RH, op, "rows");
  check_rows_dtype(rows_RH, op, "rows");
  check_cpu(rows_RH, op);
  check_cpu(row_map_TK, op);
  TORCH_CHECK(row_map_TK.dim() == 2 && row_map_TK.scalar_type() == torch::kLong, op,
              ": row_map must be a 2-D int64 tensor [tokens, top_k]");
  auto rows = rows_RH.contiguous();
  auto map = row_map_TK.contiguous();
  check_rows_in_range(map, rows.size(0), op);
  torch::Tensor probs;
  if (probs_TK.has_value()) {
    check_probs(*probs_TK, map, op);
    check_cpu(*probs_TK, op);
    probs = probs_TK->contiguous();
  }
  auto out = torch::empty({map.size(0), rows.size(1)}, rows.options());
  const float* p = probs.defined() ? probs.data_ptr<float>() : nullptr;
  dispatch_elem(rows, [&](auto tag) {
    using T = decltype(tag);
    unpermute_kernel<T>(elems<T>(rows), map.data_ptr<int64_t>(), p, map.size(0), map.size(1), rows.size(1),
                        elems<T>(out));
  });
  return out;
}

std::tuple<torch::Tensor, torch::Tensor> unpermute_backward_cpu(const torch::Tensor& grad_TH,
                                                                const torch::Tensor& rows_RH,
                                                                const torch::Tensor& row_map_TK,
                                                                const torch::Tensor& probs_TK) {
  const char* op = "unpermute_backward";
  check_2d(grad_TH, op, "grad");
  check_2d(rows_RH, op, "rows");
  check_rows_dtype(rows_RH, op, "rows");
  TORCH_CHECK(grad_TH.scalar_type() == rows_RH.scalar_type() && grad_TH.size(1) == rows_RH.size(1), op,
              ": grad ", grad_TH.sizes(), " ", grad_TH.scalar_type(), " does not match rows ", rows_RH.sizes(), " ",
              rows_RH.scalar_type());
  check_row_map(row_map_TK, grad_TH.size(0), op);
  check_probs(probs_TK, row_map_TK, op);
  for (const auto* t : {&grad_TH, &rows_RH, &row_map_TK, &probs_TK}) check_cpu(*t, op);
  auto grad = grad_TH.contiguous();
  auto rows = rows_RH.contiguous();
  auto map = row_map_TK.contiguous();
  auto probs = probs_TK.contiguous();
  check_rows_in_range(map, rows.size(0), op);
  auto grad_rows = torch::empty_like(rows);
  auto grad_probs = torch::empty_like(probs);
  dispatch_elem(rows, [&](auto tag) {
    using T = decltype(tag);
    unpermute_backward_kernel<T>(elems<T>(grad), elems<T>(rows), map.data_ptr<int64_t>(), probs.data_ptr<float>(),
                                 map.size(0), map.size(1), rows.size(1), elems<T>(grad_rows),
                                 grad_probs.data_ptr<float>());
  });
  return {grad_rows, grad_probs};
}

torch::Tensor dequantize_cpu(const torch::Tensor& rows_RH, const torch::Tensor& scales_RG, torch::ScalarType dtype) {
  const char* op = "dequantize";
  check_2d(rows_RH, op, "rows");
  check_2d(scales_RG, op, "scales");
  TORCH_CHECK(rows_RH.scalar_type() == torch::kFloat8_e4m3fn || rows_RH.scalar_type() == torch::kByte, op,
              ": rows must be float8_e4m3fn (or its uint8 bytes), got ", rows_RH.scalar_type());
  TORCH_CHECK(scales_RG.scalar_type() == torch::kFloat, op, ": scales must be float32");
  TORCH_CHECK(scales_RG.size(0) == rows_RH.size(0) && scales_RG.size(1) == num_blocks(rows_RH.size(1)), op,
              ": scales shape ", scales_RG.sizes(), " does not fit rows ", rows_RH.sizes(), " (one per 128 channels)");
  TORCH_CHECK(dtype == torch::kFloat || dtype == torch::kBFloat16, op, ": dtype must be float32 or bfloat16");
  check_cpu(rows_RH, op);
  check_cpu(scales_RG, op);
  auto q = rows_RH.contiguous();
  auto s = scales_RG.contiguous();
  auto out = torch::empty(q.sizes(), q.options().dtype(dtype));
  dispatch_elem(out, [&](auto tag) {
    using T = decltype(tag);
    dequantize_kernel<T>(reinterpret_cast<const uint8_t*>(q.data_ptr()), s.data_ptr<float>(), q.size(0), q.size(1),
                         elems<T>(out));
  });
  return out;
}

}  // namespace moe_train
