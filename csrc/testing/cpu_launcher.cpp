// A CPU stand-in for the launcher of ../sparse_head_grad.cu, for tests on machines without a GPU.
//
// Built together with ../bindings.cpp (compiled with -DHIFI_FAST_CHECKS_ON_CPU) into an extension
// whose ops take CPU tensors (tests/test_cuda_bindings_cpu.py): the real bindings -- input checks,
// error messages, output allocation and strides -- then run against whichever torch is installed,
// and the kernel runs emulated on CPU threads (emulate_kernel.cpp). Not part of the extension.

#include <torch/extension.h>

#include "emulate_kernel.cpp"

namespace hifi_fast {

void head_block_grad_cuda(
    const at::Tensor& head, const at::Tensor& dense, const at::Tensor& blocks, int64_t block_size,
    const at::Tensor& out, int64_t out_stride_r, int64_t out_stride_c, const at::Tensor& bias) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, head.scalar_type(), "head_block_grad_cpu", [&] {
    emulate<scalar_t>(
        head.data_ptr(), dense.data_ptr(), out.data_ptr(), bias.defined() ? bias.data_ptr() : nullptr,
        blocks.data_ptr<int64_t>(), blocks.numel(), dense.size(0), head.size(1), dense.size(1), block_size,
        head.stride(0), head.stride(1), dense.stride(0), dense.stride(1), out_stride_r, out_stride_c);
  });
}

}  // namespace hifi_fast
