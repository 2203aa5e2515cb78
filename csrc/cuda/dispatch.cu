// CUDA token dispatch kernels behind the launcher API of launchers.h. Includes only CUDA and csrc headers
// (the torch binding is binding.cpp), so `nvcc -std=c++17 -I csrc -c csrc/cuda/dispatch.cu` compiles it.
//
// Row data moves in 16-byte vectors when the rows allow it (hidden * element size a multiple of 16 and
// aligned pointers), else element by element; the per-element math (E4M3 conversion, block scale,
// bf16 rounding, row-map indexing) is the shared code in csrc/common/, also run by the CPU kernels.
// FP8 block amax is a warp-level max over the 16 (bf16) or 32 (fp32) lanes that hold one 128-channel
// block. On sm_89+ the E4M3 conversion is the hardware cvt.rn.satfinite (same rounding and saturation
// as the shared software conversion, which sm_80 builds use).
//
// Legend: T tokens, H hidden, K choices per token, E experts, A = T*K assignments, C chunks of kChunk
// assignments, R rows, G = ceil(H / 128) scale blocks, EPL elements per lane, LPG lanes per block.
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "common/fp8.h"
#include "common/row_map.h"
#include "cuda/launchers.h"

namespace moe_train {
namespace cuda {
namespace {

constexpr unsigned kFullMask = 0xFFFFFFFFu;
constexpr int kScanThreads = 1024;
constexpr int kMaxRowThreads = 256;

// ---------------------------------------------------------------------------------------------
// Block-wide primitives (every thread of the block must call them)

__device__ int64_t block_inclusive_scan(int64_t v, int64_t* s_warp, int64_t& total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  for (int o = 1; o < 32; o <<= 1) {
    const int64_t n = __shfl_up_sync(kFullMask, v, o);
    if (lane >= o) v += n;
  }
  if (lane == 31) s_warp[warp] = v;
  __syncthreads();
  if (warp == 0) {
    int64_t w = lane < warps ? s_warp[lane] : 0;
    for (int o = 1; o < 32; o <<= 1) {
      const int64_t n = __shfl_up_sync(kFullMask, w, o);
      if (lane >= o) w += n;
    }
    if (lane < warps) s_warp[lane] = w;
  }
  __syncthreads();
  if (warp > 0) v += s_warp[warp - 1];
  total = s_warp[warps - 1];
  __syncthreads();
  return v;
}

// Sum over the block; the result is valid in thread 0.
__device__ float block_sum(float v, float* s_warp) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  for (int o = 16; o > 0; o >>= 1) v = add_rn(v, __shfl_xor_sync(kFullMask, v, o));
  if (lane == 0) s_warp[warp] = v;
  __syncthreads();
  float total = 0.0f;
  if (threadIdx.x == 0) {
    for (int w = 0; w < warps; ++w) total = add_rn(total, s_warp[w]);
  }
  __syncthreads();
  return total;
}

// ---------------------------------------------------------------------------------------------
// Row map (csrc/common/row_map.h): chunk ranks + histograms, per-expert scans, expert offsets, rows

__global__ void chunk_rank_kernel(const int64_t* idx_A, int64_t A, int64_t E, int64_t C, int32_t* rank_A,
                                  int64_t* hist_EC, unsigned long long* invalid) {
  __shared__ int64_t s_expert[kChunk];
  const int64_t c = blockIdx.x;
  const int64_t i = c * kChunk + threadIdx.x;
  int64_t e = -1;
  if (i < A) {
    e = idx_A[i];
    const int status = expert_status(e, E);
    if (status == 2) atomicAdd(invalid, 1ull);
    if (status != 0) e = -1;
  }
  s_expert[threadIdx.x] = e;
  __syncthreads();
  if (e < 0) return;
  int rank = 0;
  bool last = true;
  for (int j = 0; j < kChunk; ++j) {
    if (s_expert[j] == e) {
      if (j < static_cast<int>(threadIdx.x)) ++rank;
      if (j > static_cast<int>(threadIdx.x)) last = false;
    }
  }
  rank_A[i] = rank;
  if (last) hist_EC[hist_index(e, c, C)] = rank + 1;
}

// hist[e][:] becomes its exclusive scan over chunks; counts[e] its total. One block per expert.
__global__ void expert_scan_kernel(int64_t* hist_EC, int64_t C, int64_t* counts_E) {
  __shared__ int64_t s_warp[32];
  const int64_t e = blockIdx.x;
  int64_t carry = 0;
  for (int64_t base = 0; base < C; base += blockDim.x) {
    const int64_t c = base + threadIdx.x;
    const int64_t v = c < C ? hist_EC[hist_index(e, c, C)] : 0;
    int64_t total = 0;
    const int64_t incl = block_inclusive_scan(v, s_warp, total);
    if (c < C) hist_EC[hist_index(e, c, C)] = carry + incl - v;
    carry += total;
  }
  if (threadIdx.x == 0) counts_E[e] = carry;
}

// offsets[e] = sum of counts before e. One block.
__global__ void expert_offsets_kernel(const int64_t* counts_E, int64_t E, int64_t* offsets_E) {
  __shared__ int64_t s_warp[32];
  int64_t carry = 0;
  for (int64_t base = 0; base < E; base += blockDim.x) {
    const int64_t e = base + threadIdx.x;
    const int64_t v = e < E ? counts_E[e] : 0;
    int64_t total = 0;
    const int64_t incl = block_inclusive_scan(v, s_warp, total);
    if (e < E) offsets_E[e] = carry + incl - v;
    carry += total;
  }
}

__global__ void assign_rows_kernel(const int64_t* idx_A, int64_t A, int64_t E, int64_t C, const int32_t* rank_A,
                                   const int64_t* base_EC, const int64_t* offsets_E, int64_t* row_map_A) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= A) return;
  const int64_t e = idx_A[i];
  row_map_A[i] = expert_status(e, E) == 0 ? row_of(offsets_E[e], base_EC[hist_index(e, i / kChunk, C)], rank_A[i]) : -1;
}

// ---------------------------------------------------------------------------------------------
// Row data: EPL elements per lane, one 16-byte vector when VEC

template <typename T, int EPL, bool VEC>
struct Lane {
  static_assert(!VEC || EPL * sizeof(T) == 16, "a vector lane holds 16 bytes");

  // n valid elements at p as floats (the rest 0).
  __device__ static void load(const T* p, int n, float (&v)[EPL]) {
    if (VEC && n == EPL) {
      const uint4 raw = *reinterpret_cast<const uint4*>(p);
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int i = 0; i < EPL; ++i) v[i] = Elem<T>::load(e[i]);
    } else {
#pragma unroll
      for (int i = 0; i < EPL; ++i) v[i] = i < n ? Elem<T>::load(p[i]) : 0.0f;
    }
  }

  __device__ static void store(T* p, int n, const float (&v)[EPL]) {
    if (VEC && n == EPL) {
      uint4 raw;
      T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
      for (int i = 0; i < EPL; ++i) e[i] = Elem<T>::store(v[i]);
      *reinterpret_cast<uint4*>(p) = raw;
    } else {
      for (int i = 0; i < n; ++i) p[i] = Elem<T>::store(v[i]);
    }
  }

  // Copy n elements from src to each of the k destinations dst_k = rows + row_k * H + h0.
  __device__ static void copy_to_rows(const T* src, int n, T* rows, const int64_t* map, int64_t K, int64_t R,
                                      int64_t H, int64_t h0) {
    if (VEC && n == EPL) {
      const uint4 raw = *reinterpret_cast<const uint4*>(src);
      for (int64_t k = 0; k < K; ++k) {
        const int64_t r = map[k];
        if (row_in_range(r, R)) *reinterpret_cast<uint4*>(rows + r * H + h0) = raw;
      }
    } else {
      for (int64_t k = 0; k < K; ++k) {
        const int64_t r = map[k];
        if (!row_in_range(r, R)) continue;
        for (int i = 0; i < n; ++i) rows[r * H + h0 + i] = src[i];
      }
    }
  }
};

// Valid elements of the lane starting at channel h0.
__device__ inline int lane_elems(int64_t h0, int64_t H, int epl) {
  const int64_t left = H - h0;
  return left <= 0 ? 0 : (left < epl ? static_cast<int>(left) : epl);
}

__device__ inline uint8_t quantize_element(float x, float scale) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 890)
  if (scale != scale) return kE4M3NaN;
  return static_cast<uint8_t>(__nv_cvt_float_to_fp8(div_rn(x, scale), __NV_SATFINITE, __NV_E4M3));
#else
  return quantize_e4m3(x, scale);
#endif
}

// Pack 4 bytes little-endian (byte i of the word is q[i]).
__device__ inline uint32_t pack4(const uint8_t* q) {
  return static_cast<uint32_t>(q[0]) | (static_cast<uint32_t>(q[1]) << 8) | (static_cast<uint32_t>(q[2]) << 16) |
         (static_cast<uint32_t>(q[3]) << 24);
}

// n bytes of q to dst; one 8- or 4-byte store for a full vector lane.
template <int EPL, bool VEC>
__device__ inline void store_bytes(uint8_t* dst, int n, const uint8_t (&q)[EPL]) {
  if constexpr (VEC && EPL == 8) {
    if (n == EPL) {
      *reinterpret_cast<uint2*>(dst) = make_uint2(pack4(q), pack4(q + 4));
      return;
    }
  } else if constexpr (VEC && EPL == 4) {
    if (n == EPL) {
      *reinterpret_cast<uint32_t*>(dst) = pack4(q);
      return;
    }
  }
  for (int i = 0; i < n; ++i) dst[i] = q[i];
}

// One block per token.
template <typename T, int EPL, bool VEC>
__global__ void permute_kernel(const T* x_TH, const int64_t* row_map_TK, const float* probs_TK, int64_t K, int64_t H,
                               int64_t R, T* rows_RH) {
  const int64_t t = blockIdx.x;
  const int64_t slots = (H + EPL - 1) / EPL;
  const int64_t* map = row_map_TK + t * K;
  for (int64_t s = threadIdx.x; s < slots; s += blockDim.x) {
    const int64_t h0 = s * EPL;
    const int n = lane_elems(h0, H, EPL);
    if (probs_TK == nullptr) {
      Lane<T, EPL, VEC>::copy_to_rows(x_TH + t * H + h0, n, rows_RH, map, K, R, H, h0);
      continue;
    }
    float v[EPL], w[EPL];
    Lane<T, EPL, VEC>::load(x_TH + t * H + h0, n, v);
    for (int64_t k = 0; k < K; ++k) {
      const int64_t r = map[k];
      if (!row_in_range(r, R)) continue;
      const float p = probs_TK[t * K + k];
#pragma unroll
      for (int i = 0; i < EPL; ++i) w[i] = mul_rn(p, v[i]);
      Lane<T, EPL, VEC>::store(rows_RH + r * H + h0, n, w);
    }
  }
}

// One block per token; the lanes of one 128-channel block are LPG consecutive lanes of one warp.
template <typename T, int EPL, bool VEC>
__global__ void permute_fp8_kernel(const T* x_TH, const int64_t* row_map_TK, int64_t K, int64_t H, int64_t R,
                                   uint8_t* rows_RH, float* scales_RG) {
  constexpr int LPG = kBlock / EPL;
  static_assert(32 % LPG == 0, "a scale block's lanes must lie in one warp");
  const int64_t t = blockIdx.x;
  const int64_t G = num_blocks(H);
  const int64_t slots = G * LPG;
  const int64_t* map = row_map_TK + t * K;
  for (int64_t base = 0; base < slots; base += blockDim.x) {  // uniform trip count: shuffles see full warps
    const int64_t s = base + threadIdx.x;
    const int64_t h0 = s * EPL;
    const int n = s < slots ? lane_elems(h0, H, EPL) : 0;
    float v[EPL];
    Lane<T, EPL, VEC>::load(x_TH + t * H + h0, n, v);
    uint32_t amax = 0;
#pragma unroll
    for (int i = 0; i < EPL; ++i) amax = amax_bits_update(amax, v[i]);
#pragma unroll
    for (int o = LPG / 2; o > 0; o >>= 1) {
      const uint32_t other = __shfl_xor_sync(kFullMask, amax, o);
      amax = other > amax ? other : amax;
    }
    if (n == 0) continue;
    const float scale = block_scale(amax);
    uint8_t q[EPL];
#pragma unroll
    for (int i = 0; i < EPL; ++i) q[i] = quantize_element(v[i], scale);
    const int64_t g = s / LPG;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t r = map[k];
      if (!row_in_range(r, R)) continue;
      store_bytes<EPL, VEC>(rows_RH + r * H + h0, n, q);
      if (s % LPG == 0) scales_RG[r * G + g] = scale;
    }
  }
}

// One block per token: thread 0 orders the token's rows ascending (next_row) into shared memory, then
// every lane sums its channels over them in that order, in fp32.
template <typename T, int EPL, bool VEC>
__global__ void unpermute_kernel(const T* rows_RH, const int64_t* row_map_TK, const float* probs_TK, int64_t K,
                                 int64_t H, int64_t R, T* out_TH) {
  extern __shared__ int64_t s_rows[];  // [K] rows, then [K] float probs
  float* s_probs = reinterpret_cast<float*>(s_rows + K);
  __shared__ int s_count;
  const int64_t t = blockIdx.x;
  if (threadIdx.x == 0) {
    const int64_t* map = row_map_TK + t * K;
    int count = 0;
    for (int k = next_row(map, static_cast<int>(K), -1); k >= 0; k = next_row(map, static_cast<int>(K), map[k])) {
      if (!row_in_range(map[k], R)) continue;
      s_rows[count] = map[k];
      s_probs[count] = probs_TK == nullptr ? 1.0f : probs_TK[t * K + k];
      ++count;
    }
    s_count = count;
  }
  __syncthreads();
  const int count = s_count;
  const int64_t slots = (H + EPL - 1) / EPL;
  for (int64_t s = threadIdx.x; s < slots; s += blockDim.x) {
    const int64_t h0 = s * EPL;
    const int n = lane_elems(h0, H, EPL);
    float acc[EPL], v[EPL];
#pragma unroll
    for (int i = 0; i < EPL; ++i) acc[i] = 0.0f;
    for (int j = 0; j < count; ++j) {
      Lane<T, EPL, VEC>::load(rows_RH + s_rows[j] * H + h0, n, v);
      if (probs_TK == nullptr) {
#pragma unroll
        for (int i = 0; i < EPL; ++i) acc[i] = add_rn(acc[i], v[i]);
      } else {
        const float p = s_probs[j];
#pragma unroll
        for (int i = 0; i < EPL; ++i) acc[i] = add_rn(acc[i], mul_rn(p, v[i]));
      }
    }
    Lane<T, EPL, VEC>::store(out_TH + t * H + h0, n, acc);
  }
}

// One block per token: grad_rows = probs * grad, grad_probs = <grad, row> (block-reduced per choice).
template <typename T, int EPL, bool VEC>
__global__ void unpermute_backward_kernel(const T* grad_TH, const T* rows_RH, const int64_t* row_map_TK,
                                          const float* probs_TK, int64_t K, int64_t H, int64_t R, T* grad_rows_RH,
                                          float* grad_probs_TK) {
  __shared__ float s_warp[32];
  const int64_t t = blockIdx.x;
  const int64_t slots = (H + EPL - 1) / EPL;
  for (int64_t k = 0; k < K; ++k) {
    const int64_t r = row_map_TK[t * K + k];
    if (!row_in_range(r, R)) {  // the same r for the whole block
      if (threadIdx.x == 0) grad_probs_TK[t * K + k] = 0.0f;
      continue;
    }
    const float p = probs_TK[t * K + k];
    float dot = 0.0f;
    for (int64_t s = threadIdx.x; s < slots; s += blockDim.x) {
      const int64_t h0 = s * EPL;
      const int n = lane_elems(h0, H, EPL);
      float g[EPL], x[EPL], w[EPL];
      Lane<T, EPL, VEC>::load(grad_TH + t * H + h0, n, g);
      Lane<T, EPL, VEC>::load(rows_RH + r * H + h0, n, x);
#pragma unroll
      for (int i = 0; i < EPL; ++i) {
        dot = add_rn(dot, mul_rn(g[i], x[i]));
        w[i] = mul_rn(p, g[i]);
      }
      Lane<T, EPL, VEC>::store(grad_rows_RH + r * H + h0, n, w);
    }
    dot = block_sum(dot, s_warp);
    if (threadIdx.x == 0) grad_probs_TK[t * K + k] = dot;
  }
}

template <typename T>
__global__ void dequantize_kernel(const uint8_t* q_RH, const float* scales_RG, int64_t R, int64_t H, T* out_RH) {
  const int64_t G = num_blocks(H), total = R * H;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const int64_t r = i / H, h = i - r * H;
    out_RH[i] = Elem<T>::store(dequantize_e4m3(q_RH[i], scales_RG[r * G + h / kBlock]));
  }
}

// ---------------------------------------------------------------------------------------------
// Launch helpers

int64_t align256(int64_t bytes) { return (bytes + 255) / 256 * 256; }

int row_threads(int64_t lanes) {
  const int64_t rounded = (lanes + 31) / 32 * 32;
  return static_cast<int>(rounded < 32 ? 32 : rounded > kMaxRowThreads ? kMaxRowThreads : rounded);
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Whether rows of H elements of `elem_size` bytes at these pointers can move as 16-byte vectors.
bool can_vectorise(int64_t H, int64_t elem_size, const void* a, const void* b, const void* c = nullptr) {
  return (H * elem_size) % 16 == 0 && aligned16(a) && aligned16(b) && (c == nullptr || aligned16(c));
}

// Call f(T{}, EPL constant, VEC constant) for the element type and vectorisation.
template <typename F>
cudaError_t with_layout(ElemType type, bool vec, F&& f) {
  using V4 = std::integral_constant<int, 4>;
  using V8 = std::integral_constant<int, 8>;
  if (type == ElemType::kFloat32) {
    if (vec) f(float{}, V4{}, std::true_type{});
    else f(float{}, V4{}, std::false_type{});
  } else {
    if (vec) f(uint16_t{}, V8{}, std::true_type{});
    else f(uint16_t{}, V4{}, std::false_type{});
  }
  return cudaGetLastError();
}

int64_t elem_size(ElemType type) { return type == ElemType::kFloat32 ? 4 : 2; }

}  // namespace

int64_t row_map_workspace_bytes(int64_t assignments, int64_t num_experts) {
  const int64_t C = num_chunks(assignments);
  return align256(num_experts * C * 8) + align256(num_experts * 8) + align256(assignments * 4);
}

cudaError_t launch_build_row_map(const int64_t* topk_idx_A, int64_t A, int64_t E, int64_t* row_map_A,
                                 int64_t* counts_E, int64_t* invalid_count, void* workspace, cudaStream_t stream) {
  const int64_t C = num_chunks(A);
  char* ws = static_cast<char*>(workspace);
  int64_t* hist_EC = reinterpret_cast<int64_t*>(ws);
  int64_t* offsets_E = reinterpret_cast<int64_t*>(ws + align256(E * C * 8));
  int32_t* rank_A = reinterpret_cast<int32_t*>(ws + align256(E * C * 8) + align256(E * 8));
  cudaError_t err = cudaMemsetAsync(invalid_count, 0, sizeof(int64_t), stream);
  if (err == cudaSuccess && C > 0) err = cudaMemsetAsync(hist_EC, 0, E * C * 8, stream);
  if (err != cudaSuccess) return err;
  auto* invalid = reinterpret_cast<unsigned long long*>(invalid_count);
  if (C > 0) chunk_rank_kernel<<<C, kChunk, 0, stream>>>(topk_idx_A, A, E, C, rank_A, hist_EC, invalid);
  expert_scan_kernel<<<E, kScanThreads, 0, stream>>>(hist_EC, C, counts_E);
  expert_offsets_kernel<<<1, kScanThreads, 0, stream>>>(counts_E, E, offsets_E);
  if (A > 0) {
    const int64_t blocks = (A + 255) / 256;
    assign_rows_kernel<<<blocks, 256, 0, stream>>>(topk_idx_A, A, E, C, rank_A, hist_EC, offsets_E, row_map_A);
  }
  return cudaGetLastError();
}

cudaError_t launch_permute(const void* x_TH, ElemType type, const int64_t* row_map_TK, const float* probs_TK,
                           int64_t T, int64_t K, int64_t H, int64_t R, void* rows_RH, cudaStream_t stream) {
  if (T == 0 || H == 0) return cudaSuccess;
  const bool vec = can_vectorise(H, elem_size(type), x_TH, rows_RH);
  return with_layout(type, vec, [&](auto elem, auto epl, auto v) {
    using Elem_ = decltype(elem);
    constexpr int EPL = decltype(epl)::value;
    const int threads = row_threads((H + EPL - 1) / EPL);
    permute_kernel<Elem_, EPL, decltype(v)::value><<<T, threads, 0, stream>>>(
        static_cast<const Elem_*>(x_TH), row_map_TK, probs_TK, K, H, R, static_cast<Elem_*>(rows_RH));
  });
}

cudaError_t launch_permute_fp8(const void* x_TH, ElemType type, const int64_t* row_map_TK, int64_t T, int64_t K,
                               int64_t H, int64_t R, uint8_t* rows_RH, float* scales_RG, cudaStream_t stream) {
  if (T == 0 || H == 0) return cudaSuccess;
  const bool vec = can_vectorise(H, elem_size(type), x_TH, rows_RH);
  return with_layout(type, vec, [&](auto elem, auto epl, auto v) {
    using Elem_ = decltype(elem);
    constexpr int EPL = decltype(epl)::value;
    const int threads = row_threads(num_blocks(H) * (kBlock / EPL));
    permute_fp8_kernel<Elem_, EPL, decltype(v)::value>
        <<<T, threads, 0, stream>>>(static_cast<const Elem_*>(x_TH), row_map_TK, K, H, R, rows_RH, scales_RG);
  });
}

cudaError_t launch_unpermute(const void* rows_RH, ElemType type, const int64_t* row_map_TK, const float* probs_TK,
                             int64_t T, int64_t K, int64_t H, int64_t R, void* out_TH, cudaStream_t stream) {
  if (T == 0 || H == 0) return cudaSuccess;
  if (K > kMaxTopK) return cudaErrorInvalidValue;
  const bool vec = can_vectorise(H, elem_size(type), rows_RH, out_TH);
  const size_t smem = static_cast<size_t>(K) * (sizeof(int64_t) + sizeof(float));
  return with_layout(type, vec, [&](auto elem, auto epl, auto v) {
    using Elem_ = decltype(elem);
    constexpr int EPL = decltype(epl)::value;
    const int threads = row_threads((H + EPL - 1) / EPL);
    unpermute_kernel<Elem_, EPL, decltype(v)::value><<<T, threads, smem, stream>>>(
        static_cast<const Elem_*>(rows_RH), row_map_TK, probs_TK, K, H, R, static_cast<Elem_*>(out_TH));
  });
}

cudaError_t launch_unpermute_backward(const void* grad_TH, const void* rows_RH, ElemType type,
                                      const int64_t* row_map_TK, const float* probs_TK, int64_t T, int64_t K,
                                      int64_t H, int64_t R, void* grad_rows_RH, float* grad_probs_TK,
                                      cudaStream_t stream) {
  if (T == 0) return cudaSuccess;
  const bool vec = can_vectorise(H, elem_size(type), grad_TH, rows_RH, grad_rows_RH);
  return with_layout(type, vec, [&](auto elem, auto epl, auto v) {
    using Elem_ = decltype(elem);
    constexpr int EPL = decltype(epl)::value;
    const int threads = row_threads((H + EPL - 1) / EPL);
    unpermute_backward_kernel<Elem_, EPL, decltype(v)::value><<<T, threads, 0, stream>>>(
        static_cast<const Elem_*>(grad_TH), static_cast<const Elem_*>(rows_RH), row_map_TK, probs_TK, K, H, R,
        static_cast<Elem_*>(grad_rows_RH), grad_probs_TK);
  });
}

cudaError_t launch_dequantize(const uint8_t* q_RH, const float* scales_RG, int64_t R, int64_t H, ElemType out_type,
                              void* out_RH, cudaStream_t stream) {
  const int64_t total = R * H;
  if (total == 0) return cudaSuccess;
  const int64_t wanted = (total + 255) / 256;
  const unsigned blocks = static_cast<unsigned>(wanted < (1 << 20) ? wanted : (1 << 20));
  if (out_type == ElemType::kFloat32) {
    dequantize_kernel<float><<<blocks, 256, 0, stream>>>(q_RH, scales_RG, R, H, static_cast<float*>(out_RH));
  } else {
    dequantize_kernel<uint16_t><<<blocks, 256, 0, stream>>>(q_RH, scales_RG, R, H, static_cast<uint16_t*>(out_RH));
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace moe_train
