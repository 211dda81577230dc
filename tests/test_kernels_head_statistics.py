"""Triton ``head_grams`` (``hifi_fast.kernels``) against the PyTorch reference (``hifi_fast.ops``)
and a plain per-example float64 computation.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (conftest sets
``TRITON_INTERPRET=1``), so the shapes are tiny: T below and above the 64-token tile, rows with only
1-3 valid tokens, large garbage in padded positions (must be masked, not read), d_h = 12 and 80,
one head, strided context views, fp32/fp16/bf16. The GPU-only test compiles the kernels: run it
with ``TRITON_INTERPRET=0``.

Tolerances: the Gram is accumulated in float64 from exact fp32->fp64 products, so it matches float64
to ``rtol=1e-12``; the centred cross-head term is fp32 (DESIGN §2: fine for CKA), ``rtol=1e-5``
against float64 and against the PyTorch op (atol 1e-6 of the largest entry). Entropies from the
kernel's Grams match the SVD reference to 1e-6 relative (the §2 richness rule is 1e-4).
"""

import pytest
import torch

from hifi_fast import kernels, ops
from reference import entropy_of

from conftest import DEVICE, compiled_gpu

# The kernels widen every tile before tl.dot, so bf16 runs under the interpreter too.
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _context(batch, tokens, heads, dim, valid, dtype, layout="bthd", seed=0):
    """Context ``[B, T, H, d]`` on DEVICE with 1e4 in padded positions, and a long mask.
    ``layout``: ``"bthd"`` a view of ``[B, T, H*d]`` (the attention output), ``"bhtd"`` a permuted
    view of ``[B, H, T, d]`` (strided along T)."""
    g = torch.Generator().manual_seed(seed)
    if layout == "bthd":
        ctx = torch.randn(batch, tokens, heads * dim, generator=g).view(batch, tokens, heads, dim)
    else:
        ctx = torch.randn(batch, heads, tokens, dim, generator=g).permute(0, 2, 1, 3)
    ctx = ctx + 0.5  # a token mean for the centring to remove
    ctx[:, :, 0] *= 3.0  # heads of different scales
    mask = torch.zeros(batch, tokens, dtype=torch.long)
    for b, n in enumerate(valid):
        mask[b, :n] = 1
    ctx.masked_fill_(mask[:, :, None, None] == 0, 1e4)
    return ctx.to(device=DEVICE, dtype=dtype), mask.to(DEVICE)


def _float64_stats(ctx, valid):
    """Per-example loops over the valid tokens only: (gram [B, H, d, d], cross [B, H, H])."""
    grams, crosses = [], []
    for b, n in enumerate(valid):
        c = ctx[b, :n].cpu().double().transpose(0, 1)  # [H, n, d]
        centred = c - c.mean(dim=1, keepdim=True) if n else c
        grams.append(c.transpose(1, 2) @ c)
        products = torch.einsum("itp,jtq->ijpq", centred, centred)
        crosses.append(products.square().sum(dim=(2, 3)))
    return torch.stack(grams), torch.stack(crosses)


CASES = {
    "short-rows-d12": ((3, 13, 3, 12), [13, 3, 1], "bthd"),
    "two-token-tiles": ((2, 70, 2, 8), [70, 66], "bthd"),
    "one-head-d80-strided": ((2, 9, 1, 80), [9, 2], "bhtd"),
    "d16-strided-empty-row": ((3, 6, 4, 16), [6, 0, 3], "bhtd"),
    "d136-wider-than-the-kernels": ((2, 5, 2, 136), [5, 2], "bthd"),  # the PyTorch op on the same device
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_head_grams(dtype, case):
    shape, valid, layout = case
    ctx, mask = _context(*shape, valid, dtype, layout)
    gram, cross = kernels.head_grams(ctx, mask)
    batch, _, heads, dim = shape
    assert gram.shape == (batch, heads, dim, dim) and gram.dtype == torch.float64
    assert cross.shape == (batch, heads, heads) and cross.dtype == torch.float32

    want_gram, want_cross = _float64_stats(ctx, valid)
    torch.testing.assert_close(gram.cpu(), want_gram, rtol=1e-12, atol=1e-12)
    atol = 1e-6 * want_cross.abs().max().item()
    torch.testing.assert_close(cross.cpu().double(), want_cross, rtol=1e-5, atol=atol)
    ref_gram, ref_cross = ops.head_grams(ctx, mask)
    torch.testing.assert_close(gram, ref_gram, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cross, ref_cross, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bool_mask_and_entropy_precision_when_tokens_fewer_than_head_dim(dtype):
    # MiniLM-like: sentences shorter than d_h (rank-deficient Grams), singular values spread over
    # 3 decades; in 16 bits too, where the reference is the SVD of the same 16-bit values.
    valid = [7, 3, 5, 2]
    ctx, mask = _context(4, 7, 2, 32, valid, torch.float32, seed=3)
    ctx = (ctx * torch.logspace(0, -3, 32, device=DEVICE)).to(dtype)
    entropy = ops.entropy_from_grams(kernels.head_grams(ctx, mask.bool())[0])
    for b, n in enumerate(valid):
        for h in range(2):
            assert entropy[b, h].item() == pytest.approx(entropy_of(ctx[b, :n, h].cpu()), rel=1e-6)


@compiled_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [32, 64, 80, 96, 128])
def test_gpu_realistic_shapes(dtype, dim):
    valid = [128, 77, 3, 1, 100, 128, 64, 65]
    ctx, mask = _context(len(valid), 128, 12, dim, valid, dtype)
    gram, cross = kernels.head_grams(ctx, mask)
    want_gram, want_cross = _float64_stats(ctx, valid)
    torch.testing.assert_close(gram.cpu(), want_gram, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cross.cpu().double(), want_cross, rtol=1e-5, atol=1e-6 * want_cross.abs().max().item())
