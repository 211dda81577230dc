"""Triton sparse-head gradients (``hifi_fast.kernels``) against the PyTorch reference
(``hifi_fast.ops``) and a plain float64 computation.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (conftest sets
``TRITON_INTERPRET=1``), so the shapes are tiny and odd: N not a multiple of the token tile, head
sizes that are not powers of two, one head, all heads, fused GQA-like QKV block lists, strided inputs.
bf16 cases need CUDA. The GPU-only tests compile the kernels: run them with ``TRITON_INTERPRET=0``.

Tolerances: against float64, fp32 ``rtol=atol=1e-5`` (atol scaled by √N, the size of the sums), fp16
``rtol=atol=1e-3`` (the exact fp16 inputs leave only fp32 summation and the final fp16 rounding,
≤ 2⁻¹¹ relative); against the PyTorch op in the same dtype, fp32 as above and fp16/bf16 two
output ulps (``rtol`` 2e-3 / 1.6e-2), which covers a different summation order flipping a rounding.
On GPU, at realistic sizes: error vs float64 ≤ 2x PyTorch's own error in the same dtype plus the fp32
summation slack (``conftest.summation_slack``).
"""

import pytest
import torch

from hifi_fast import backends, kernels, ops

from conftest import DEVICE, INTERPRET, KERNEL_DTYPES as DTYPES, assert_within_twice_torch, compiled_gpu, summation_slack
VS_FLOAT64 = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
VS_TORCH = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _close(got, want, tol, n):
    torch.testing.assert_close(got.double().cpu(), want.double().cpu(), rtol=tol, atol=tol * max(1.0, n ** 0.5))


def _features(blocks, block_size):
    return torch.cat([torch.arange(b, b + block_size) for b in blocks])


def _randn(rows, cols, dtype, seed, column_major=False):
    """``[rows, cols]`` on DEVICE; ``column_major`` gives a transposed (non-row-major) view."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(cols, rows, generator=g).t() if column_major else torch.randn(rows, cols, generator=g)
    return t.to(device=DEVICE, dtype=dtype)


# (N, head size, blocks, d_out, column_major grad_out). The fused GQA case is a Llama-like
# q/k/v projection with 4 query heads and 2 key/value heads of 16: query heads 1 and 3 and the two
# kv heads they read, in the k and v parts.
ROWS_CASES = {
    "one-head": (7, 8, [16], 32, False),
    "all-heads-d12": (37, 12, [0, 12, 24], 36, False),
    "fused-gqa-qkv": (33, 16, [16, 48, 64, 80, 96, 112], 128, False),
    "d80-strided": (33, 80, [80], 160, True),
    "one-token": (1, 8, [0, 8], 16, False),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ROWS_CASES.values(), ids=ROWS_CASES.keys())
def test_head_rows_grad(dtype, case):
    n, block_size, blocks, d_out, column_major = case
    grad_out = _randn(n, d_out, dtype, 0, column_major)
    inp = _randn(n, 20, dtype, 1)
    index = torch.tensor(blocks, device=DEVICE)
    grad_w, grad_b = kernels.head_rows_grad(grad_out, inp, index, block_size, True)
    assert grad_w.shape == (len(blocks) * block_size, 20) and grad_w.dtype == dtype
    assert grad_b.shape == (len(blocks) * block_size,) and grad_b.dtype == dtype

    rows = _features(blocks, block_size)
    _close(grad_w, grad_out.cpu().double()[:, rows].T @ inp.cpu().double(), VS_FLOAT64[dtype], n)
    _close(grad_b, grad_out.cpu().double()[:, rows].sum(0), VS_FLOAT64[dtype], n)
    ref_w, ref_b = ops.head_rows_grad(grad_out, inp, index, block_size, True)
    _close(grad_w, ref_w, VS_TORCH[dtype], n)
    _close(grad_b, ref_b, VS_TORCH[dtype], n)
    assert kernels.head_rows_grad(grad_out, inp, index, block_size, False)[1] is None


# (N, head size, blocks, d_in, d_out, column_major inp)
COLS_CASES = {
    "one-head": (5, 8, [24], 32, 9, False),
    "some-heads-d12": (19, 12, [0, 24, 60], 72, 20, False),
    "all-heads-d80-strided": (33, 80, [0, 80], 160, 17, True),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", COLS_CASES.values(), ids=COLS_CASES.keys())
def test_head_cols_grad(dtype, case):
    n, block_size, blocks, d_in, d_out, column_major = case
    grad_out = _randn(n, d_out, dtype, 2)
    inp = _randn(n, d_in, dtype, 3, column_major)
    index = torch.tensor(blocks, device=DEVICE)
    got = kernels.head_cols_grad(grad_out, inp, index, block_size)
    assert got.shape == (d_out, len(blocks) * block_size) and got.dtype == dtype

    cols = _features(blocks, block_size)
    _close(got, grad_out.cpu().double().T @ inp.cpu().double()[:, cols], VS_FLOAT64[dtype], n)
    _close(got, ops.head_cols_grad(grad_out, inp, index, block_size), VS_TORCH[dtype], n)


def test_rejects_mismatched_inputs():
    index = torch.tensor([0], device=DEVICE)
    with pytest.raises(ValueError, match="dtype"):
        kernels.head_rows_grad(_randn(4, 8, torch.float32, 0), _randn(4, 8, torch.float16, 1), index, 8, True)
    with pytest.raises(ValueError, match=r"\[N, d_out\]"):
        kernels.head_cols_grad(_randn(4, 8, torch.float32, 0), _randn(5, 8, torch.float32, 1), index, 8)


@pytest.mark.skipif(not INTERPRET, reason="Triton was set up for compiled kernels; the interpreter cannot be switched on later")
def test_backend_dispatches_cpu_tensors_to_triton_when_interpreting(monkeypatch):
    monkeypatch.setenv("HIFI_FAST_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    backends.load.cache_clear()  # forget a module loaded before this test changed the environment
    grad_out, inp = torch.randn(9, 24), torch.randn(9, 10)
    module = backends.ops_for(grad_out)
    assert module is kernels and module.AVAILABLE
    assert module.head_rows_grad is kernels.sparse_head_grad.head_rows_grad
    assert module.head_grams is kernels.head_statistics.head_grams
    index = torch.tensor([8])
    got, _ = module.head_rows_grad(grad_out, inp, index, 8, False)
    _close(got, ops.head_rows_grad(grad_out, inp, index, 8, False)[0], 1e-5, 9)


@compiled_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "block_size, heads, selected", [(64, 12, [3]), (80, 16, [0, 5, 9, 15]), (128, 8, list(range(8)))]
)
def test_gpu_error_within_twice_torch(dtype, block_size, heads, selected):
    n, d_model = 4099, heads * block_size
    grad_out, inp = _randn(n, 3 * d_model, dtype, 4), _randn(n, d_model, dtype, 5)
    # fused QKV rows: the selected heads in each of q, k and v
    rows = torch.tensor([part * d_model + h * block_size for part in range(3) for h in selected], device=DEVICE)
    cols = torch.tensor([h * block_size for h in selected], device=DEVICE)
    dy, x = grad_out.double(), inp.double()
    dy_rows = dy[:, ops.feature_index(rows, block_size)]
    want_w, want_b = dy_rows.T @ x, dy_rows.sum(0)
    got_w, got_b = kernels.head_rows_grad(grad_out, inp, rows, block_size, True)
    ref_w, ref_b = ops.head_rows_grad(grad_out, inp, rows, block_size, True)
    assert_within_twice_torch(got_w, ref_w, want_w, summation_slack(dy_rows, x))
    assert_within_twice_torch(got_b, ref_b, want_b, summation_slack(dy_rows, torch.ones_like(x[:, :1])))

    out_proj_dy = grad_out[:, :d_model]
    x_cols = x[:, ops.feature_index(cols, block_size)]
    want_c = out_proj_dy.double().T @ x_cols
    got_c = kernels.head_cols_grad(out_proj_dy, inp, cols, block_size)
    ref_c = ops.head_cols_grad(out_proj_dy, inp, cols, block_size)
    assert_within_twice_torch(got_c, ref_c, want_c, summation_slack(out_proj_dy, x_cols))


@pytest.mark.skipif(not INTERPRET, reason="Triton was set up for compiled kernels; the interpreter cannot be switched on later")
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("sliced, blocks, view, with_bias", [
    ("rows", [8], (8, 8), True),            # one head: a view of the weight's rows
    ("rows", [0, 16], None, True),          # separate heads: a compact copy, gathered
    ("rows", [16, 0], None, False),         # out of order, no bias
    ("cols", [8, 16], None, False),         # the output projection's input columns
])
def test_each_plan_kind_trains_the_slices_through_the_eager_path(monkeypatch, backend, sliced, blocks, view, with_bias):
    """``sparse_head_linear`` eagerly (the slice-gradient function fixed once per plan and backend,
    ``eager_slice_grads``) against float64 autograd of a dense weight, for every kind of plan."""
    from hifi_fast.tuning.sparse_head_linear import SliceIndex, SlicePlan, sparse_head_linear

    monkeypatch.setenv("HIFI_FAST_BACKEND", backend)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    backends.load.cache_clear()
    x, weight, bias = _randn(6, 24, torch.float32, 0).reshape(2, 3, 24), _randn(24, 24, torch.float32, 1), _randn(1, 24, torch.float32, 2)[0]
    index = ops.feature_index(torch.tensor(blocks), 8)
    dim = 0 if sliced == "rows" else 1
    slices = [weight.index_select(dim, index).clone().requires_grad_()]
    if with_bias:
        slices.append(bias[index].clone().requires_grad_())
    plan = SlicePlan(sliced, 8, with_bias, view)
    y = sparse_head_linear(x, weight, bias, tuple(slices), plan, SliceIndex(torch.tensor(blocks), index, backend))
    grad_out = _randn(6, 24, torch.float32, 3).reshape(2, 3, 24)
    y.backward(grad_out)
    dense_w = weight.double().requires_grad_()
    dense_b = bias.double().requires_grad_()
    torch.nn.functional.linear(x.double(), dense_w, dense_b).backward(grad_out.double())
    _close(slices[0].grad, dense_w.grad.index_select(dim, index), 1e-5, 6)
    if with_bias:
        _close(slices[1].grad, dense_b.grad[index], 1e-5, 6)
    backends.load.cache_clear()
