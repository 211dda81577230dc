// The eager head-slice linear as a C++ autograd node; hifi_fast/tuning/native.py builds it.
//
//   head_slice_linear(slice_weight, slice_bias, index, kind, start, length, x, weight, bias) -> y
//
// y = x Wᵀ + b, where only the head slices of W (and of b) train. The same ops, in the same order,
// as the Python autograd Function of the eager path (sparse_head_linear.EagerHeadSliceLinearFunction
// with the torch backend's slice gradients), so the results are the same to the bit. What differs is
// the host's cost: the engine calls this backward without entering Python, which saves tens of
// microseconds per projection per step on a launch-bound GPU (bench/host_overhead.py).
//
// The fixed arguments come first, so that the module binds them once at patch time.
// slice_weight, slice_bias: the trainable slices (slice_bias is None without bias entries); they
//   only carry gradients, since `weight` already holds their values.
// kind: kRowsRun, the slice is the rows [start, start + length) (a view); kRowsIndex, the rows
//   `index`; kColsIndex, the input columns `index` (the output projection).

#include <torch/extension.h>

#include <optional>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

enum Kind : int64_t { kRowsRun = 0, kRowsIndex = 1, kColsIndex = 2 };

// Positions of the arguments of `forward`: the gradient list has one entry per argument, and
// `needs_input_grad` counts the tensors given (slice_bias is the third one when it is given).
enum Arg : size_t { kX = 0, kSliceWeight = 1, kSliceBias = 2, kArgs = 9 };

struct HeadSliceLinear : public torch::autograd::Function<HeadSliceLinear> {
  static at::Tensor forward(
      AutogradContext* ctx, const at::Tensor& x, const at::Tensor& slice_weight,
      const std::optional<at::Tensor>& slice_bias, const at::Tensor& index, int64_t kind, int64_t start,
      int64_t length, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
    ctx->save_for_backward({x, weight, index});
    ctx->saved_data["kind"] = kind;
    ctx->saved_data["start"] = start;
    ctx->saved_data["length"] = length;
    // Grad mode is off here: skip the autograd and view-tracking layers of the ops (as torchvision's
    // C++ autograd Functions do); the node records the graph.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return at::linear(x, weight, bias);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const at::Tensor& weight = saved[1];
    const at::Tensor& index = saved[2];
    const at::Tensor& grad_out = grads[0];
    variable_list result(kArgs);
    // The same below the autograd layers, unless a graph of the backward is asked for (create_graph).
    std::optional<at::AutoDispatchBelowADInplaceOrView> below_autograd;
    if (!at::GradMode::is_enabled()) {
      below_autograd.emplace();
    }
    if (ctx->needs_input_grad(kX)) {
      // Under autocast the gradient is in the autocast dtype and the weight in its own.
      result[kX] = grad_out.matmul(weight.scalar_type() == grad_out.scalar_type() ? weight : weight.to(grad_out.scalar_type()));
    }
    if (!ctx->needs_input_grad(kSliceWeight) && !ctx->needs_input_grad(kSliceBias)) {
      return result;
    }
    // The slice gradients are taken in the gradient's dtype, from [N, features] views.
    const at::Tensor grad_2d = grad_out.reshape({-1, grad_out.size(-1)});
    at::Tensor x_2d = x.reshape({-1, x.size(-1)});
    if (x_2d.scalar_type() != grad_2d.scalar_type()) {
      x_2d = x_2d.to(grad_2d.scalar_type());
    }
    const int64_t kind = ctx->saved_data["kind"].toInt();
    if (kind == kColsIndex) {
      result[kSliceWeight] = at::mm(grad_2d.t(), x_2d.index_select(1, index));
      return result;
    }
    const at::Tensor grad_rows = kind == kRowsRun
        ? grad_2d.narrow(1, ctx->saved_data["start"].toInt(), ctx->saved_data["length"].toInt())
        : grad_2d.index_select(1, index);
    result[kSliceWeight] = at::mm(grad_rows.t(), x_2d);
    if (ctx->needs_input_grad(kSliceBias)) {
      result[kSliceBias] = grad_rows.sum(0);
    }
    return result;
  }
};

at::Tensor head_slice_linear(
    const at::Tensor& slice_weight, const std::optional<at::Tensor>& slice_bias, const at::Tensor& index,
    int64_t kind, int64_t start, int64_t length, const at::Tensor& x, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(kind == kRowsRun || kind == kRowsIndex || kind == kColsIndex,
              "head_slice_linear: kind must be 0 (rows run), 1 (rows index) or 2 (columns index), got ", kind);
  TORCH_CHECK(!(kind == kColsIndex && slice_bias.has_value()),
              "head_slice_linear: a column slice has no bias entries");
  return HeadSliceLinear::apply(x, slice_weight, slice_bias, index, kind, start, length, weight, bias);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("head_slice_linear", &head_slice_linear,
        "y = x W^T + b with gradients for the head slices of W and b only (a C++ autograd node)");
  m.attr("ROWS_RUN") = static_cast<int64_t>(kRowsRun);
  m.attr("ROWS_INDEX") = static_cast<int64_t>(kRowsIndex);
  m.attr("COLS_INDEX") = static_cast<int64_t>(kColsIndex);
}
