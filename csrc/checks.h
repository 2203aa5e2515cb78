// Argument checks shared by the CPU and CUDA torch bindings (torch headers: .cpp files only).
#pragma once
#include <torch/extension.h>

#include <string>

namespace moe_train {

// The kernels move fp32 and bf16 rows.
inline void check_rows_dtype(const torch::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kBFloat16, op, ": ", name,
              " must be float32 or bfloat16, got ", x.scalar_type());
}

inline void check_2d(const torch::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(x.dim() == 2, op, ": ", name, " must be 2-D, got ", x.dim(), "-D");
}

// row_map_TK: int64 [T, K], matching the tokens' T.
inline void check_row_map(const torch::Tensor& row_map, int64_t tokens, const char* op) {
  TORCH_CHECK(row_map.dim() == 2 && row_map.scalar_type() == torch::kLong, op,
              ": row_map must be a 2-D int64 tensor [tokens, top_k]");
  TORCH_CHECK(row_map.size(0) == tokens, op, ": row_map has ", row_map.size(0), " tokens, expected ", tokens);
}

// probs_TK: float32 with the row map's shape.
inline void check_probs(const torch::Tensor& probs, const torch::Tensor& row_map, const char* op) {
  TORCH_CHECK(probs.scalar_type() == torch::kFloat, op, ": probs must be float32, got ", probs.scalar_type());
  TORCH_CHECK(probs.sizes() == row_map.sizes(), op, ": probs shape ", probs.sizes(), " != row_map shape ",
              row_map.sizes());
}

inline void check_same_device(const torch::Tensor& a, const torch::Tensor& b, const char* op) {
  TORCH_CHECK(a.device() == b.device(), op, ": tensors on ", a.device(), " and ", b.device());
}

// Whether the element type is bf16 (stored as uint16_t bit patterns by the kernels).
inline bool is_bf16(const torch::Tensor& x) { return x.scalar_type() == torch::kBFloat16; }

}  // namespace moe_train
