// Python bindings of the moe_train CPU extension (module moe_train._C).
#include <torch/extension.h>

#include <tuple>

#include "common/fp8.h"

namespace moe_train {
torch::Tensor permute_rows_cpu(const torch::Tensor& x_TH, const torch::Tensor& src_index_N);
std::tuple<torch::Tensor, torch::Tensor> build_row_map_cpu(const torch::Tensor& topk_idx_TK, int64_t num_experts);
torch::Tensor permute_cpu(const torch::Tensor& x_TH, const torch::Tensor& row_map_TK, int64_t num_rows,
                          const c10::optional<torch::Tensor>& probs_TK);
std::tuple<torch::Tensor, torch::Tensor> permute_fp8_cpu(const torch::Tensor& x_TH, const torch::Tensor& row_map_TK,
                                                         int64_t num_rows);
torch::Tensor unpermute_cpu(const torch::Tensor& rows_RH, const torch::Tensor& row_map_TK,
                            const c10::optional<torch::Tensor>& probs_TK);
std::tuple<torch::Tensor, torch::Tensor> unpermute_backward_cpu(const torch::Tensor& grad_TH,
                                                                const torch::Tensor& rows_RH,
                                                                const torch::Tensor& row_map_TK,
                                                                const torch::Tensor& probs_TK);
torch::Tensor dequantize_cpu(const torch::Tensor& rows_RH, const torch::Tensor& scales_RG, torch::ScalarType dtype);
torch::Tensor swiglu_forward_cpu(const torch::Tensor& gate, const torch::Tensor& up);
std::tuple<torch::Tensor, torch::Tensor> swiglu_backward_cpu(const torch::Tensor& grad, const torch::Tensor& gate,
                                                             const torch::Tensor& up);

// Element-wise E4M3 conversion of float32 values (the shared header's float_to_e4m3), for tests.
torch::Tensor cast_e4m3_cpu(const torch::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.device().is_cpu(), "cast_e4m3: CPU float32 tensor expected");
  auto src = x.contiguous();
  auto out = torch::empty(src.sizes(), src.options().dtype(torch::kByte));
  const float* s = src.data_ptr<float>();
  uint8_t* d = out.data_ptr<uint8_t>();
  for (int64_t i = 0; i < src.numel(); ++i) d[i] = float_to_e4m3(s[i]);
  return out;
}
}  // namespace moe_train

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "moe_train C++ kernels (CPU, OpenMP)";
  m.def("permute_rows", &moe_train::permute_rows_cpu, "Gather token rows into a new order (CPU)");
  m.def("build_row_map", &moe_train::build_row_map_cpu, py::arg("topk_idx"), py::arg("num_experts"),
        "Row map [T, K] (-1 = dropped) and tokens per expert of a routing");
  m.def("permute", &moe_train::permute_cpu, py::arg("x"), py::arg("row_map"), py::arg("num_rows"),
        py::arg("probs") = py::none(), "Rows grouped by expert (optionally scaled by probs)");
  m.def("permute_fp8", &moe_train::permute_fp8_cpu, py::arg("x"), py::arg("row_map"), py::arg("num_rows"),
        "Rows grouped by expert as FP8 E4M3 plus one fp32 scale per 128 channels");
  m.def("unpermute", &moe_train::unpermute_cpu, py::arg("rows"), py::arg("row_map"), py::arg("probs") = py::none(),
        "Sum of each token's rows (weighted by probs), fp32 accumulation in ascending row order");
  m.def("unpermute_backward", &moe_train::unpermute_backward_cpu, py::arg("grad"), py::arg("rows"),
        py::arg("row_map"), py::arg("probs"), "Gradients of the weighted unpermute: (grad_rows, grad_probs)");
  m.def("dequantize", &moe_train::dequantize_cpu, py::arg("rows"), py::arg("scales"), py::arg("dtype"),
        "FP8 E4M3 rows times their block scales, as dtype");
  m.def("swiglu", &moe_train::swiglu_forward_cpu, py::arg("gate"), py::arg("up"),
        "silu(gate) * up in one pass (float32)");
  m.def("swiglu_backward", &moe_train::swiglu_backward_cpu, py::arg("grad"), py::arg("gate"), py::arg("up"),
        "Gradients of silu(gate) * up: (grad_gate, grad_up), one pass (float32)");
  m.def("cast_e4m3", &moe_train::cast_e4m3_cpu, "Element-wise float32 -> E4M3 bytes (test hook)");
}
