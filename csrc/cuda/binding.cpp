// Python bindings of the CUDA extension (module moe_train._C_cuda): torch tensors in, the plain launcher
// API of launchers.h underneath. Same functions and signatures as the CPU module moe_train._C.
//
// Legend: T tokens, H hidden, K choices per token, E experts, R rows, G = ceil(H / 128) scale blocks.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <tuple>

#include "checks.h"
#include "common/fp8.h"
#include "cuda/launchers.h"

namespace moe_train {
namespace {

void check_cuda(const torch::Tensor& x, const char* op) {
  TORCH_CHECK(x.is_cuda(), op, ": CUDA tensors only, got one on ", x.device());
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

cuda::ElemType elem_type(const torch::Tensor& x) {
  return is_bf16(x) ? cuda::ElemType::kBFloat16 : cuda::ElemType::kFloat32;
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

const float* optional_probs(const c10::optional<torch::Tensor>& probs_TK, const torch::Tensor& map,
                            torch::Tensor& holder, const char* op) {
  if (!probs_TK.has_value()) return nullptr;
  check_probs(*probs_TK, map, op);
  check_same_device(*probs_TK, map, op);
  holder = probs_TK->contiguous();
  return holder.data_ptr<float>();
}

}  // namespace

std::tuple<torch::Tensor, torch::Tensor> build_row_map_cuda(const torch::Tensor& topk_idx_TK, int64_t num_experts) {
  const char* op = "build_row_map";
  TORCH_CHECK(topk_idx_TK.dim() == 2 && topk_idx_TK.scalar_type() == torch::kLong, op,
              ": topk_idx must be a 2-D int64 tensor [tokens, top_k]");
  TORCH_CHECK(num_experts > 0, op, ": num_experts (", num_experts, ") must be > 0");
  check_cuda(topk_idx_TK, op);
  const c10::cuda::CUDAGuard guard(topk_idx_TK.device());
  auto idx = topk_idx_TK.contiguous();
  const int64_t A = idx.numel();
  auto row_map = torch::empty_like(idx);
  auto counts = torch::empty({num_experts}, idx.options());
  auto invalid = torch::empty({1}, idx.options());
  auto workspace = torch::empty({cuda::row_map_workspace_bytes(A, num_experts)}, idx.options().dtype(torch::kByte));
  check_launch(cuda::launch_build_row_map(idx.data_ptr<int64_t>(), A, num_experts, row_map.data_ptr<int64_t>(),
                                          counts.data_ptr<int64_t>(), invalid.data_ptr<int64_t>(),
                                          workspace.data_ptr(), stream()),
               op);
  const int64_t bad = invalid.item<int64_t>();  // device sync: report invalid expert ids
  TORCH_CHECK(bad == 0, op, ": ", bad, " expert ids out of range [-1, ", num_experts, ")");
  return {row_map, counts};
}

torch::Tensor permute_cuda(const torch::Tensor& x_TH, const torch::Tensor& row_map_TK, int64_t num_rows,
                           const c10::optional<torch::Tensor>& probs_TK) {
  const char* op = "permute";
  check_2d(x_TH, op, "tokens");
  check_rows_dtype(x_TH, op, "tokens");
  check_row_map(row_map_TK, x_TH.size(0), op);
  check_cuda(x_TH, op);
  check_same_device(x_TH, row_map_TK, op);
  const c10::cuda::CUDAGuard guard(x_TH.device());
  auto x = x_TH.contiguous();
  auto map = row_map_TK.contiguous();
  torch::Tensor probs;
  const float* p = optional_probs(probs_TK, map, probs, op);
  auto out = torch::empty({num_rows, x.size(1)}, x.options());
  check_launch(cuda::launch_permute(x.data_ptr(), elem_type(x), map.data_ptr<int64_t>(), p, x.size(0), map.size(1),
                                    x.size(1), num_rows, out.data_ptr(), stream()),
               op);
  return out;
}

std::tuple<torch::Tensor, torch::Tensor> permute_fp8_cuda(const torch::Tensor& x_TH, const torch::Tensor& row_map_TK,
                                                          int64_t num_rows) {
  const char* op = "permute_fp8";
  check_2d(x_TH, op, "tokens");
  check_rows_dtype(x_TH, op, "tokens");
  check_row_map(row_map_TK, x_TH.size(0), op);
  check_cuda(x_TH, op);
  check_same_device(x_TH, row_map_TK, op);
  const c10::cuda::CUDAGuard guard(x_TH.device());
  auto x = x_TH.contiguous();
  auto map = row_map_TK.contiguous();
  const int64_t H = x.size(1);
  auto rows = torch::empty({num_rows, H}, x.options().dtype(torch::kFloat8_e4m3fn));
  auto scales = torch::empty({num_rows, num_blocks(H)}, x.options().dtype(torch::kFloat));
  check_launch(cuda::launch_permute_fp8(x.data_ptr(), elem_type(x), map.data_ptr<int64_t>(), x.size(0), map.size(1),
                                        H, num_rows, reinterpret_cast<uint8_t*>(rows.data_ptr()),
                                        scales.data_ptr<float>(), stream()),
               op);
  return {rows, scales};
}

torch::Tensor unpermute_cuda(const torch::Tensor& rows_RH, const torch::Tensor& row_map_TK,
                             const c10::optional<torch::Tensor>& probs_TK) {
  const char* op = "unpermute";
  check_2d(rows_RH, op, "rows");
  check_rows_dtype(rows_RH, op, "rows");
  TORCH_CHECK(row_map_TK.dim() == 2 && row_map_TK.scalar_type() == torch::kLong, op,
              ": row_map must be a 2-D int64 tensor [tokens, top_k]");
  check_cuda(rows_RH, op);
  check_same_device(rows_RH, row_map_TK, op);
  const c10::cuda::CUDAGuard guard(rows_RH.device());
  auto rows = rows_RH.contiguous();
  auto map = row_map_TK.contiguous();
  TORCH_CHECK(map.size(1) <= cuda::kMaxTopK, op, ": top_k (", map.size(1), ") must be <= ", cuda::kMaxTopK);
  torch::Tensor probs;
  const float* p = optional_probs(probs_TK, map, probs, op);
  auto out = torch::empty({map.size(0), rows.size(1)}, rows.options());
  check_launch(cuda::launch_unpermute(rows.data_ptr(), elem_type(rows), map.data_ptr<int64_t>(), p, map.size(0),
                                      map.size(1), rows.size(1), rows.size(0), out.data_ptr(), stream()),
               op);
  return out;
}

std::tuple<torch::Tensor, torch::Tensor> unpermute_backward_cuda(const torch::Tensor& grad_TH,
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
  check_cuda(rows_RH, op);
  for (const auto* t : {&grad_TH, &row_map_TK, &probs_TK}) check_same_device(*t, rows_RH, op);
  const c10::cuda::CUDAGuard guard(rows_RH.device());
  auto grad = grad_TH.contiguous();
  auto rows = rows_RH.contiguous();
  auto map = row_map_TK.contiguous();
  auto probs = probs_TK.contiguous();
  auto grad_rows = torch::empty_like(rows);
  auto grad_probs = torch::empty_like(probs);
  check_launch(cuda::launch_unpermute_backward(grad.data_ptr(), rows.data_ptr(), elem_type(rows),
                                               map.data_ptr<int64_t>(), probs.data_ptr<float>(), map.size(0),
                                               map.size(1), rows.size(1), rows.size(0), grad_rows.data_ptr(),
                                               grad_probs.data_ptr<float>(), stream()),
               op);
  return {grad_rows, grad_probs};
}

torch::Tensor dequantize_cuda(const torch::Tensor& rows_RH, const torch::Tensor& scales_RG, torch::ScalarType dtype) {
  const char* op = "dequantize";
  check_2d(rows_RH, op, "rows");
  check_2d(scales_RG, op, "scales");
  TORCH_CHECK(rows_RH.scalar_type() == torch::kFloat8_e4m3fn || rows_RH.scalar_type() == torch::kByte, op,
              ": rows must be float8_e4m3fn (or its uint8 bytes), got ", rows_RH.scalar_type());
  TORCH_CHECK(scales_RG.scalar_type() == torch::kFloat, op, ": scales must be float32");
  TORCH_CHECK(scales_RG.size(0) == rows_RH.size(0) && scales_RG.size(1) == num_blocks(rows_RH.size(1)), op,
              ": scales shape ", scales_RG.sizes(), " does not fit rows ", rows_RH.sizes(), " (one per 128 channels)");
  TORCH_CHECK(dtype == torch::kFloat || dtype == torch::kBFloat16, op, ": dtype must be float32 or bfloat16");
  check_cuda(rows_RH, op);
  check_same_device(rows_RH, scales_RG, op);
  const c10::cuda::CUDAGuard guard(rows_RH.device());
  auto q = rows_RH.contiguous();
  auto s = scales_RG.contiguous();
  auto out = torch::empty(q.sizes(), q.options().dtype(dtype));
  const auto type = dtype == torch::kBFloat16 ? cuda::ElemType::kBFloat16 : cuda::ElemType::kFloat32;
  check_launch(cuda::launch_dequantize(reinterpret_cast<const uint8_t*>(q.data_ptr()), s.data_ptr<float>(), q.size(0),
                                       q.size(1), type, out.data_ptr(), stream()),
               op);
  return out;
}

}  // namespace moe_train

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "moe_train CUDA kernels";
  m.def("build_row_map", &moe_train::build_row_map_cuda, py::arg("topk_idx"), py::arg("num_experts"),
        "Row map [T, K] (-1 = dropped) and tokens per expert of a routing");
  m.def("permute", &moe_train::permute_cuda, py::arg("x"), py::arg("row_map"), py::arg("num_rows"),
        py::arg("probs") = py::none(), "Rows grouped by expert (optionally scaled by probs)");
  m.def("permute_fp8", &moe_train::permute_fp8_cuda, py::arg("x"), py::arg("row_map"), py::arg("num_rows"),
        "Rows grouped by expert as FP8 E4M3 plus one fp32 scale per 128 channels");
  m.def("unpermute", &moe_train::unpermute_cuda, py::arg("rows"), py::arg("row_map"), py::arg("probs") = py::none(),
        "Sum of each token's rows (weighted by probs), fp32 accumulation in ascending row order");
  m.def("unpermute_backward", &moe_train::unpermute_backward_cuda, py::arg("grad"), py::arg("rows"),
        py::arg("row_map"), py::arg("probs"), "Gradients of the weighted unpermute: (grad_rows, grad_probs)");
  m.def("dequantize", &moe_train::dequantize_cuda, py::arg("rows"), py::arg("scales"), py::arg("dtype"),
        "FP8 E4M3 rows times their block scales, as dtype");
}
