// Python bindings of the moe_train C++ extension (module moe_train._C).
#include <torch/extension.h>

namespace moe_train {
torch::Tensor permute_rows_cpu(const torch::Tensor& x_TH, const torch::Tensor& src_index_N);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "moe_train C++ kernels";
  m.def("permute_rows", &moe_train::permute_rows_cpu, "Gather token rows into a new order (CPU)");
}
