"""Kernel micro-benchmarks (pytest-benchmark): ``python -m pytest bench/test_bench_kernels.py``.

Sparse-head weight gradient (the backend's op) vs gather + matmul vs the dense GEMM of the whole
projection, and the scoring statistics vs a naive per-head ``svdvals`` loop, over layer sizes of
BERT-base, RoBERTa-large and a Llama-1B-like model. ``extra_info`` records FLOP/s and the device.
On CPU only the PyTorch backend runs and the token count is reduced; figures are speed figures only
on a GPU with compiled kernels (never under ``TRITON_INTERPRET``).
"""
import os

import pytest
import torch

from hifi_fast import backends, ops
from hifi_fast.backends import available_backends

CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
DEVICE = torch.device("cuda" if CUDA else "cpu")
TOKENS = 8192 if CUDA else 512
# name: (d_model, heads, head_dim)
LAYERS = {"bert-base": (768, 12, 64), "roberta-large": (1024, 16, 64), "llama-1b": (2048, 32, 64)}
DTYPES = [torch.bfloat16, torch.float32] if CUDA else [torch.float32]


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _operands(layer, heads_selected, dtype):
    d_model, heads, head_dim = LAYERS[layer]
    g = torch.Generator(device=DEVICE).manual_seed(0)
    dy = torch.randn(TOKENS, d_model, device=DEVICE, generator=g).to(dtype)
    x = torch.randn(TOKENS, d_model, device=DEVICE, generator=g).to(dtype)
    step = heads // heads_selected
    blocks = torch.arange(0, heads, step, device=DEVICE)[:heads_selected] * head_dim
    return dy, x, blocks, head_dim


def _record(benchmark, flops, **info):
    benchmark.extra_info.update(info, device=str(torch.cuda.get_device_name(0) if CUDA else "cpu"), flops=flops)
    mean = benchmark.stats.stats.mean if benchmark.stats else None
    if mean:
        benchmark.extra_info["tflops"] = flops / mean / 1e12


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads_selected", [1, 2, 4])
@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("impl", available_backends(DEVICE.type) + ["gather_matmul", "dense_gemm"])
def test_sparse_head_row_grad(benchmark, impl, layer, heads_selected, dtype, monkeypatch):
    dy, x, blocks, head_dim = _operands(layer, heads_selected, dtype)
    rows = len(blocks) * head_dim
    if impl == "gather_matmul":
        index = ops.feature_index(blocks, head_dim)
        fn = lambda: dy.index_select(1, index).t().mm(x)  # noqa: E731
    elif impl == "dense_gemm":  # what full fine-tuning computes; FLOPs counted for the same rows
        fn = lambda: dy.t().mm(x)  # noqa: E731
    else:
        monkeypatch.setenv("HIFI_FAST_BACKEND", impl)
        module = backends.ops_for(dy)
        fn = lambda: module.head_rows_grad(dy, x, blocks, head_dim, True)  # noqa: E731

    def run():
        fn()
        _sync()

    benchmark(run)
    flops = 2 * TOKENS * (dy.shape[1] if impl == "dense_gemm" else rows) * x.shape[1]
    _record(benchmark, flops, impl=impl, layer=layer, heads_selected=heads_selected, dtype=str(dtype))


def _naive_entropy_loop(context, mask):
    out = []
    for b in range(context.shape[0]):
        n = int(mask[b].sum())
        for h in range(context.shape[2]):
            s = torch.linalg.svdvals(context[b, :n, h].double())
            p = s / s.sum()
            out.append(-(p * p.clamp_min(1e-30).log()).sum())
    return torch.stack(out)


@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("impl", available_backends(DEVICE.type) + ["naive_svdvals_loop"])
def test_scoring_statistics(benchmark, impl, layer, monkeypatch):
    d_model, heads, head_dim = LAYERS[layer]
    batch, tokens = (32, 128) if CUDA else (8, 64)
    context = torch.randn(batch, tokens, heads, head_dim, device=DEVICE)
    mask = torch.ones(batch, tokens, device=DEVICE)
    mask[::2, tokens // 2 :] = 0
    if impl == "naive_svdvals_loop":
        fn = lambda: _naive_entropy_loop(context, mask)  # noqa: E731
    else:
        monkeypatch.setenv("HIFI_FAST_BACKEND", impl)
        module = backends.ops_for(context)

        def fn():
            gram, cross = module.head_grams(context, mask)
            return ops.entropy_from_grams(gram), ops.cka_from_cross(cross)

    def run():
        fn()
        _sync()

    benchmark(run)
    _record(benchmark, 0, impl=impl, layer=layer)
