"""The PyTorch ops (the reference every backend matches) against float64 computations written
plainly, over dtypes and odd shapes. Tolerances: fp32 1e-5 relative, fp16/bf16 per their epsilon."""
import pytest
import torch

from hifi_fast import ops
from reference import cka_of, entropy_of

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-2, 2e-2), torch.bfloat16: (5e-2, 5e-2)}


def _blocks(selected, block_size, offset=0):
    return torch.tensor([offset + h * block_size for h in selected], dtype=torch.long)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "n, heads, block_size, selected, fused",
    [(7, 4, 8, [2], False), (13, 3, 12, [0, 1, 2], False), (33, 5, 16, [0, 3, 4], True), (1, 2, 4, [1], True)],
)
def test_head_rows_grad(dtype, n, heads, block_size, selected, fused):
    g = torch.Generator().manual_seed(0)
    d_out = heads * block_size * (3 if fused else 1)
    d_in = 10
    dy = torch.randn(n, d_out, generator=g).to(dtype)
    x = torch.randn(n, d_in, generator=g).to(dtype)
    # fused QKV: the same heads in each of the three parts
    blocks = torch.cat([_blocks(selected, block_size, part * heads * block_size) for part in range(3 if fused else 1)])
    grad_w, grad_b = ops.head_rows_grad(dy, x, blocks, block_size, with_bias=True)
    rows = torch.cat([torch.arange(b, b + block_size) for b in blocks.tolist()])
    ref_w = dy.double()[:, rows].T @ x.double()
    ref_b = dy.double()[:, rows].sum(0)
    rtol, atol = TOL[dtype]
    assert grad_w.dtype == dtype and grad_w.shape == (len(rows), d_in)
    torch.testing.assert_close(grad_w.double(), ref_w, rtol=rtol, atol=atol * max(1, n ** 0.5))
    torch.testing.assert_close(grad_b.double(), ref_b, rtol=rtol, atol=atol * max(1, n ** 0.5))
    assert ops.head_rows_grad(dy, x, blocks, block_size, with_bias=False)[1] is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n, heads, block_size, selected", [(5, 4, 8, [3]), (19, 6, 12, [0, 2, 5]), (8, 2, 16, [0, 1])])
def test_head_cols_grad(dtype, n, heads, block_size, selected):
    g = torch.Generator().manual_seed(1)
    d_out = 9
    dy = torch.randn(n, d_out, generator=g).to(dtype)
    x = torch.randn(n, heads * block_size, generator=g).to(dtype)
    blocks = _blocks(selected, block_size)
    got = ops.head_cols_grad(dy, x, blocks, block_size)
    cols = torch.cat([torch.arange(b, b + block_size) for b in blocks.tolist()])
    ref = dy.double().T @ x.double()[:, cols]
    rtol, atol = TOL[dtype]
    assert got.dtype == dtype and got.shape == (d_out, len(cols))
    torch.testing.assert_close(got.double(), ref, rtol=rtol, atol=atol * max(1, n ** 0.5))


def _context(batch, tokens, heads, dim, valid, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randn(batch, tokens, heads, dim, generator=g)
    ctx[..., 0, :] *= 3.0  # heads of different scales
    mask = torch.zeros(batch, tokens, dtype=torch.long)
    for b, n in enumerate(valid):
        mask[b, :n] = 1
    return ctx.to(dtype), mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "shape, valid",
    [((2, 9, 3, 4), [9, 5]), ((3, 5, 2, 8), [5, 1, 3]), ((1, 17, 4, 6), [17]), ((2, 4, 1, 12), [2, 4])],
)
def test_head_statistics_match_svd_and_explicit_cka(dtype, shape, valid):
    ctx, mask = _context(*shape, valid, dtype)
    gram, cross = ops.head_grams(ctx, mask)
    entropy = ops.entropy_from_grams(gram)
    cka = ops.cka_from_cross(cross)
    batch, _, heads, _ = shape
    assert gram.dtype == torch.float64 and cross.shape == (batch, heads, heads)
    for b in range(batch):
        n = valid[b]
        c = ctx[b, :n].double()
        for h in range(heads):
            assert entropy[b, h].item() == pytest.approx(entropy_of(c[:, h]), rel=1e-6)
            for k in range(heads):
                assert cka[b, h, k].item() == pytest.approx(cka_of(c[:, h], c[:, k]), rel=1e-5, abs=1e-6)


def test_entropy_of_rank_deficient_and_zero_outputs():
    ctx = torch.zeros(1, 6, 2, 8)
    ctx[0, :, 1] = torch.outer(torch.arange(1.0, 7.0), torch.linspace(-1, 1, 8))  # rank 1
    gram, cross = ops.head_grams(ctx, torch.ones(1, 6))
    entropy = ops.entropy_from_grams(gram)
    assert entropy[0, 0].item() == 0.0
    assert entropy[0, 1].item() == pytest.approx(0.0, abs=1e-6)
    cka = ops.cka_from_cross(cross)
    assert cka[0, 0, 1].item() == 0.0 and cka[0, 0, 0].item() == 0.0


def test_entropy_precision_when_tokens_fewer_than_head_dim():
    # MiniLM-like: short sentences, d_h = 32 > T; float64 Grams keep the small singular values.
    ctx, mask = _context(4, 7, 3, 32, [7, 3, 5, 2], torch.float32, seed=3)
    ctx = ctx * torch.logspace(0, -3, 32)
    entropy = ops.entropy_from_grams(ops.head_grams(ctx, mask)[0])
    for b, n in enumerate([7, 3, 5, 2]):
        for h in range(3):
            assert entropy[b, h].item() == pytest.approx(entropy_of(ctx[b, :n, h]), rel=1e-6)


def test_feature_index():
    got = ops.feature_index(torch.tensor([0, 8, 20]), 4)
    assert got.tolist() == [0, 1, 2, 3, 8, 9, 10, 11, 20, 21, 22, 23]
