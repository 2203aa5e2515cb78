// Plain C++ launcher API of the CUDA dispatch kernels (no torch types), implemented in dispatch.cu and
// called by the torch binding in binding.cpp. Pointers are device pointers to contiguous row-major
// arrays; every launcher is asynchronous on `stream` and returns the launch error (cudaSuccess if none).
//
// Legend: T tokens, H hidden, K choices per token, E experts, A = T*K assignments, R rows,
// G = ceil(H / 128) FP8 scale blocks. Element types: fp32, or bf16 passed as its uint16_t patterns.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace moe_train {
namespace cuda {

enum class ElemType : int { kFloat32 = 0, kBFloat16 = 1 };

constexpr int64_t kMaxTopK = 4096;  // launch_unpermute stages a token's K rows in shared memory

// Bytes of scratch memory launch_build_row_map needs (256-byte aligned pieces).
int64_t row_map_workspace_bytes(int64_t assignments, int64_t num_experts);

// topk_idx_A (expert ids, -1 = dropped) -> row_map_A and counts_E. Ids outside [-1, E) are treated as
// dropped and counted in *invalid_count (device int64, zeroed by the launcher) for the caller to check.
cudaError_t launch_build_row_map(const int64_t* topk_idx_A, int64_t assignments, int64_t num_experts,
                                 int64_t* row_map_A, int64_t* counts_E, int64_t* invalid_count, void* workspace,
                                 cudaStream_t stream);

// rows[row_map[t, k]] = x[t] (times probs[t, k] when probs != nullptr). Rows outside [0, R) are skipped.
cudaError_t launch_permute(const void* x_TH, ElemType type, const int64_t* row_map_TK, const float* probs_TK,
                           int64_t tokens, int64_t top_k, int64_t hidden, int64_t num_rows, void* rows_RH,
                           cudaStream_t stream);

// The permute fused with FP8 E4M3 quantisation: rows_RH bytes and scales_RG (csrc/common/fp8.h rules).
cudaError_t launch_permute_fp8(const void* x_TH, ElemType type, const int64_t* row_map_TK, int64_t tokens,
                               int64_t top_k, int64_t hidden, int64_t num_rows, uint8_t* rows_RH, float* scales_RG,
                               cudaStream_t stream);

// out[t] = sum over k (K <= kMaxTopK) in ascending row order of probs[t, k] * rows[row_map[t, k]] (fp32 accumulation).
cudaError_t launch_unpermute(const void* rows_RH, ElemType type, const int64_t* row_map_TK, const float* probs_TK,
                             int64_t tokens, int64_t top_k, int64_t hidden, int64_t num_rows, void* out_TH,
                             cudaStream_t stream);

// grad_rows[row_map[t, k]] = probs[t, k] * grad[t]; grad_probs[t, k] = <grad[t], rows[row_map[t, k]]>.
cudaError_t launch_unpermute_backward(const void* grad_TH, const void* rows_RH, ElemType type,
                                      const int64_t* row_map_TK, const float* probs_TK, int64_t tokens,
                                      int64_t top_k, int64_t hidden, int64_t num_rows, void* grad_rows_RH,
                                      float* grad_probs_TK, cudaStream_t stream);

// out = e4m3(q) * scale of its 128-channel block, as `out_type`.
cudaError_t launch_dequantize(const uint8_t* q_RH, const float* scales_RG, int64_t rows, int64_t hidden,
                              ElemType out_type, void* out_RH, cudaStream_t stream);

}  // namespace cuda
}  // namespace moe_train
