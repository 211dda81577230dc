// Python bindings of the hifi_fast CUDA extension (`hifi_fast._cuda`): input checks, output
// allocation, and the call into the one-launch kernel in sparse_head_grad.cu.
//
//   head_rows_grad(grad_out, inp, blocks, block_size, with_bias) -> (grad_w, grad_b or None)
//   head_cols_grad(grad_out, inp, blocks, block_size) -> grad_w
//
// Same semantics as hifi_fast.ops.head_rows_grad / head_cols_grad (the PyTorch reference); the
// Python wrappers in hifi_fast/cuda_ext.py are what the backend dispatch calls.

#include <torch/extension.h>

#include <tuple>

namespace hifi_fast {

// Defined in sparse_head_grad.cu.
int row_tile(int64_t block_size);
void head_block_grad_cuda(
    const at::Tensor& head, const at::Tensor& dense, const at::Tensor& blocks, int64_t block_size,
    const at::Tensor& out, int64_t out_stride_r, int64_t out_stride_c, const at::Tensor& bias);

namespace {

constexpr int64_t kMaxGridYZ = 65535;  // CUDA's limit on gridDim.y (row tiles) and gridDim.z (head blocks)

// The device the tensors must be on. tests/test_cuda_bindings_cpu.py builds this file with
// HIFI_FAST_CHECKS_ON_CPU and a CPU stand-in launcher (csrc/testing/cpu_launcher.cpp) into an
// extension that takes CPU tensors: every check, message and output layout below runs in CI, against
// each torch version the package supports, where no GPU is.
#ifdef HIFI_FAST_CHECKS_ON_CPU
constexpr c10::DeviceType kDevice = c10::DeviceType::CPU;
#else
constexpr c10::DeviceType kDevice = c10::DeviceType::CUDA;
#endif

void check_inputs(
    const char* op, const at::Tensor& grad_out, const at::Tensor& inp, const at::Tensor& blocks,
    int64_t block_size) {
  TORCH_CHECK(
      grad_out.device().type() == kDevice, op, ": grad_out must be a ", c10::DeviceTypeName(kDevice),
      " tensor, got one on ", grad_out.device());
  TORCH_CHECK(
      inp.device() == grad_out.device(), op, ": inp must be on grad_out's device ", grad_out.device(),
      ", got ", inp.device());
  TORCH_CHECK(
      grad_out.dim() == 2 && inp.dim() == 2, op, ": expected grad_out [N, d_out] and inp [N, d_in], got ",
      grad_out.sizes(), " and ", inp.sizes());
  TORCH_CHECK(
      grad_out.size(0) == inp.size(0), op, ": grad_out and inp must have the same number of rows N, got ",
      grad_out.size(0), " and ", inp.size(0));
  TORCH_CHECK(
      grad_out.scalar_type() == inp.scalar_type(), op, ": grad_out and inp must have the same dtype, got ",
      grad_out.scalar_type(), " and ", inp.scalar_type());
  const auto dtype = grad_out.scalar_type();
  TORCH_CHECK(
      dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble, op,
      ": dtype must be float32, float16, bfloat16 or float64, got ", dtype);
  TORCH_CHECK(blocks.scalar_type() == at::kLong, op, ": blocks must be int64, got ", blocks.scalar_type());
  TORCH_CHECK(blocks.dim() == 1, op, ": blocks must be 1-D [num_blocks], got shape ", blocks.sizes());
  TORCH_CHECK(
      blocks.device() == grad_out.device(), op, ": blocks must be on grad_out's device ", grad_out.device(),
      ", got ", blocks.device());
  TORCH_CHECK(block_size >= 0, op, ": block_size must be >= 0, got ", block_size);
  TORCH_CHECK(
      blocks.numel() <= kMaxGridYZ, op, ": at most ", kMaxGridYZ, " head blocks per call, got ", blocks.numel());
  TORCH_CHECK(
      (block_size + row_tile(block_size) - 1) / row_tile(block_size) <= kMaxGridYZ, op, ": block_size ",
      block_size, " is too large");
  // The block starts are not range-checked here (that would need a device sync, and the Triton
  // backend does not either): features outside the head operand read as zero in the kernel.
}

std::tuple<at::Tensor, at::Tensor> head_rows_grad(
    const at::Tensor& grad_out, const at::Tensor& inp, const at::Tensor& blocks, int64_t block_size,
    bool with_bias) {
  check_inputs("head_rows_grad", grad_out, inp, blocks, block_size);
  const int64_t rows = blocks.numel() * block_size;
  at::Tensor grad_weight = at::empty({rows, inp.size(1)}, grad_out.options());
  at::Tensor grad_bias = with_bias ? at::empty({rows}, grad_out.options()) : at::Tensor();
  head_block_grad_cuda(
      grad_out, inp, blocks.contiguous(), block_size, grad_weight, grad_weight.stride(0), grad_weight.stride(1),
      grad_bias);
  return {grad_weight, grad_bias};  // an undefined grad_bias reaches Python as None
}

at::Tensor head_cols_grad(
    const at::Tensor& grad_out, const at::Tensor& inp, const at::Tensor& blocks, int64_t block_size) {
  check_inputs("head_cols_grad", grad_out, inp, blocks, block_size);
  at::Tensor grad_weight = at::empty({grad_out.size(1), blocks.numel() * block_size}, grad_out.options());
  // Computed as (inp[:, S]ᵀ grad_out)ᵀ: the kernel's head rows are the columns of grad_weight.
  head_block_grad_cuda(
      inp, grad_out, blocks.contiguous(), block_size, grad_weight, grad_weight.stride(1), grad_weight.stride(0),
      at::Tensor());
  return grad_weight;
}

}  // namespace
}  // namespace hifi_fast

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hifi_fast sparse-head weight gradients (one CUDA launch per projection, fp32 accumulation)";
  m.def(
      "head_rows_grad", &hifi_fast::head_rows_grad,
      "(dW_S [nb*bs, d_in], db_S [nb*bs] or None): dW_S[b*bs+r, c] = sum_n grad_out[n, blocks[b]+r] * inp[n, c]",
      py::arg("grad_out"), py::arg("inp"), py::arg("blocks"), py::arg("block_size"), py::arg("with_bias"));
  m.def(
      "head_cols_grad", &hifi_fast::head_cols_grad,
      "dW[:, S] [d_out, nb*bs]: dW[o, b*bs+r] = sum_n grad_out[n, o] * inp[n, blocks[b]+r]",
      py::arg("grad_out"), py::arg("inp"), py::arg("blocks"), py::arg("block_size"));
}
