// CPU token permute: gather token rows into expert-sorted order (OpenMP over rows).
#include <torch/extension.h>

#include "common/permute.h"

namespace moe_train {

template <typename T>
void permute_rows_kernel(const T* src, T* dst, const int64_t* idx, int64_t rows, int64_t hidden) {
#pragma omp parallel for
  for (int64_t i = 0; i < rows; ++i) copy_row(src, dst, idx[i], i, hidden);
}

torch::Tensor permute_rows_cpu(const torch::Tensor& x_TH, const torch::Tensor& src_index_N) {
  TORCH_CHECK(x_TH.dim() == 2, "permute_rows: x must be 2-D [tokens, hidden], got ", x_TH.dim(), "-D");
  TORCH_CHECK(src_index_N.dim() == 1 && src_index_N.scalar_type() == torch::kLong,
              "permute_rows: index must be a 1-D int64 tensor");
  TORCH_CHECK(x_TH.device().is_cpu() && src_index_N.device().is_cpu(), "permute_rows: CPU tensors only");
  auto x = x_TH.contiguous();
  auto index = src_index_N.contiguous();
  const int64_t rows = index.size(0), hidden = x.size(1), tokens = x.size(0);
  auto out = torch::empty({rows, hidden}, x.options());
  const int64_t* idx = index.data_ptr<int64_t>();
  for (int64_t i = 0; i < rows; ++i) {
    TORCH_CHECK(idx[i] >= 0 && idx[i] < tokens, "permute_rows: index ", idx[i], " out of range [0, ", tokens, ")");
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "permute_rows_cpu", [&] {
    permute_rows_kernel(x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), idx, rows, hidden);
  });
  return out;
}

}  // namespace moe_train
