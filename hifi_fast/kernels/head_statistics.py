"""Per-head scoring statistics in Triton (DESIGN §1.2-1.3, §2 "Scoring kernels").

Same op and semantics as ``hifi_fast.ops.head_statistics.head_grams``, in two streaming passes over
the tokens of each example, reading ``context`` in place through its strides (it is usually a view of
the attention output ``[B, T, H*d]``) with padding masked on load:

1. per (example, head, block of Gram columns): the uncentred Gram ``CᵀC`` accumulated in float64
   (products of fp32 values are exact in fp64, so the small singular values survive) and the token
   mean over valid tokens;
2. per (example, head pair i <= j): the centred ``Ĉ_iᵀ Ĉ_j`` in fp32, reduced on chip to
   ``‖Ĉ_iᵀ Ĉ_j‖_F²`` and written to both ``(i, j)`` and ``(j, i)``.

Centring subtracts the mean before the product (the second pass needs the first's means) rather
than correcting ``CᵀC`` afterwards, which would cancel catastrophically in fp32.

The fp64 Gram is one ``tl.dot`` per token tile (DMMA on sm_80/sm_90). Its operand tiles are carried
into the loop iteration that uses them (loaded one iteration ahead): Triton sizes a dot operand's
register layout by the narrowest load it can trace the operand back to, and a 16-bit load would
give fp64 a layout its MMA lowering rejects ("fp64 don't support largeK MMA"); the trace stops at
a loop-carried value. ``python -m hifi_fast.kernels.compile_check`` proves it for every dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from hifi_fast import ops as torch_ops


@triton.jit
def _load_valid_tile(ctx_ptrs, mask_ptrs, start, offs_t, tokens, dim_ok):
    """Tokens ``start + offs_t`` of one head as fp32 ``[BLOCK_T, BLOCK_D]`` with padding and
    out-of-range entries 0 (never read), and the fp32 validity of each token."""
    in_range = (start + offs_t) < tokens
    valid = in_range & (tl.load(mask_ptrs, mask=in_range, other=0) != 0)
    keep = valid[:, None] & dim_ok[None, :]
    return tl.load(ctx_ptrs, mask=keep, other=0.0).to(tl.float32), keep, valid.to(tl.float32)


@triton.jit
def _head_gram_kernel(
    ctx_ptr, mask_ptr, gram_ptr, mean_ptr,
    tokens, heads, dim,
    stride_cb, stride_ct, stride_ch, stride_cd, stride_mb, stride_mt,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """Program (head x column block, example): fp64 ``CᵀC[:, cols]`` -> ``gram[b, h, :, cols]`` and
    the fp32 token mean of those columns -> ``mean[b, h, cols]``. Column blocks of ``BLOCK_E`` keep
    the fp64 accumulator within registers for wide heads."""
    col_blocks: tl.constexpr = BLOCK_D // BLOCK_E
    head = tl.program_id(0) // col_blocks
    batch = tl.program_id(1).to(tl.int64)
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = (tl.program_id(0) % col_blocks) * BLOCK_E + tl.arange(0, BLOCK_E)
    dim_ok = offs_d < dim
    col_ok = offs_e < dim
    head_ptrs = ctx_ptr + batch * stride_cb + head * stride_ch + offs_t[:, None] * stride_ct
    rows_ptrs = head_ptrs + offs_d[None, :] * stride_cd
    cols_ptrs = head_ptrs + offs_e[None, :] * stride_cd
    mask_ptrs = mask_ptr + batch * stride_mb + offs_t * stride_mt

    gram = tl.zeros((BLOCK_D, BLOCK_E), dtype=tl.float64)
    total = tl.zeros((BLOCK_E,), dtype=tl.float64)
    count = tl.zeros((BLOCK_T,), dtype=tl.float32)
    rows, _, valid = _load_valid_tile(rows_ptrs, mask_ptrs, 0, offs_t, tokens, dim_ok)
    cols, _, _ = _load_valid_tile(cols_ptrs, mask_ptrs, 0, offs_t, tokens, col_ok)
    rows, cols = rows.to(tl.float64), cols.to(tl.float64)
    for start in range(0, tokens, BLOCK_T):
        # The next tiles (all masked past the end) are loaded before these are used: see the module
        # docstring for why the dot's operands must be loop-carried.
        rows_ptrs += BLOCK_T * stride_ct
        cols_ptrs += BLOCK_T * stride_ct
        mask_ptrs += BLOCK_T * stride_mt
        next_rows, _, next_valid = _load_valid_tile(rows_ptrs, mask_ptrs, start + BLOCK_T, offs_t, tokens, dim_ok)
        next_cols, _, _ = _load_valid_tile(cols_ptrs, mask_ptrs, start + BLOCK_T, offs_t, tokens, col_ok)
        gram = tl.dot(tl.trans(rows), cols, gram, input_precision="ieee", out_dtype=tl.float64)
        total += tl.sum(cols, axis=0)
        count += valid
        rows, cols, valid = next_rows.to(tl.float64), next_cols.to(tl.float64), next_valid

    row = batch * heads + head
    gram_ptrs = gram_ptr + (row * dim + offs_d[:, None]) * dim + offs_e[None, :]
    tl.store(gram_ptrs, gram, mask=dim_ok[:, None] & col_ok[None, :])
    mean = total / tl.maximum(tl.sum(count, axis=0), 1.0)
    tl.store(mean_ptr + row * dim + offs_e, mean.to(tl.float32), mask=col_ok)


@triton.jit
def _centred_cross_kernel(
    ctx_ptr, mask_ptr, mean_ptr, cross_ptr,
    tokens, heads, dim,
    stride_cb, stride_ct, stride_ch, stride_cd, stride_mb, stride_mt,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (head pair, example): ``‖Ĉ_iᵀ Ĉ_j‖_F²`` -> ``cross[b, i, j]`` and ``cross[b, j, i]``.
    The grid covers all ``H²`` pairs; those below the diagonal leave at once (symmetry)."""
    head_i = tl.program_id(0) // heads
    head_j = tl.program_id(0) % heads
    if head_j < head_i:
        return
    batch = tl.program_id(1).to(tl.int64)
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    dim_ok = offs_d < dim
    mean_i = tl.load(mean_ptr + (batch * heads + head_i) * dim + offs_d, mask=dim_ok, other=0.0)
    mean_j = tl.load(mean_ptr + (batch * heads + head_j) * dim + offs_d, mask=dim_ok, other=0.0)
    tile_ptrs = ctx_ptr + batch * stride_cb + offs_t[:, None] * stride_ct + offs_d[None, :] * stride_cd
    mask_ptrs = mask_ptr + batch * stride_mb + offs_t * stride_mt

    acc = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    for start in range(0, tokens, BLOCK_T):
        c_i, keep, _ = _load_valid_tile(tile_ptrs + head_i * stride_ch, mask_ptrs, start, offs_t, tokens, dim_ok)
        c_j, _, _ = _load_valid_tile(tile_ptrs + head_j * stride_ch, mask_ptrs, start, offs_t, tokens, dim_ok)
        # Padding must stay exactly 0 after centring.
        c_i = tl.where(keep, c_i - mean_i[None, :], 0.0)
        c_j = tl.where(keep, c_j - mean_j[None, :], 0.0)
        acc = tl.dot(tl.trans(c_i), c_j, acc, input_precision="ieee")
        tile_ptrs += BLOCK_T * stride_ct
        mask_ptrs += BLOCK_T * stride_mt

    frob = tl.sum(tl.sum(acc * acc, axis=1), axis=0)
    tl.store(cross_ptr + (batch * heads + head_i) * heads + head_j, frob)
    tl.store(cross_ptr + (batch * heads + head_j) * heads + head_i, frob)


# Launch shapes per BLOCK_D: the largest token tiles whose accumulators (d x BLOCK_E fp64 for the
# Gram, d x d fp32 for the cross term) and operand tiles stay in registers, with no spills on
# sm_80 and sm_90 in any input dtype under Triton 3.6 and 3.8 (``python -m
# hifi_fast.kernels.compile_check`` checks it).
_GRAM_TILES = {32: dict(BLOCK_E=32, BLOCK_T=32, num_warps=4), 64: dict(BLOCK_E=64, BLOCK_T=32, num_warps=8),
               128: dict(BLOCK_E=64, BLOCK_T=16, num_warps=8)}
_CROSS_TILES = {32: dict(BLOCK_T=32, num_warps=4), 64: dict(BLOCK_T=16, num_warps=8),
                128: dict(BLOCK_T=16, num_warps=16)}
MAX_HEAD_DIM = 128


def head_grams(context: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gram statistics of one batch of one layer's head outputs (two kernel launches).

    Heads wider than ``MAX_HEAD_DIM`` (whose d x d fp64 accumulator would not fit in registers) go
    to the PyTorch op on the same device.

    Args:
        context: ``[B, T, H, d]`` per-head context outputs (fp32/fp16/bf16, any strides, e.g. a view
            of ``[B, T, H*d]``); ``d`` need not be a power of two.
        mask: ``[B, T]``, nonzero on valid tokens (any dtype).

    Returns:
        ``gram``: ``[B, H, d, d]`` float64 uncentred per-head Grams ``CᵀC`` over valid tokens.
        ``cross``: ``[B, H, H]`` float32 ``‖Ĉ_iᵀ Ĉ_j‖_F²`` of the outputs centred over valid tokens.
    """
    if context.dim() != 4 or mask.shape != context.shape[:2]:
        raise ValueError(
            f"expected context [B, T, H, d] and mask [B, T], got {tuple(context.shape)} and {tuple(mask.shape)}"
        )
    batch, tokens, heads, dim = context.shape
    if dim > MAX_HEAD_DIM:
        return torch_ops.head_grams(context, mask)
    gram = torch.empty(batch, heads, dim, dim, device=context.device, dtype=torch.float64)
    cross = torch.empty(batch, heads, heads, device=context.device, dtype=torch.float32)
    if gram.numel() == 0:
        return gram, cross.zero_()
    mean = torch.empty(batch, heads, dim, device=context.device, dtype=torch.float32)
    block_d = max(32, triton.next_power_of_2(dim))
    args = (tokens, heads, dim, *context.stride(), *mask.stride())
    gram_meta = _GRAM_TILES[block_d]
    _head_gram_kernel[(heads * (block_d // gram_meta["BLOCK_E"]), batch)](
        context, mask, gram, mean, *args, BLOCK_D=block_d, **gram_meta)
    _centred_cross_kernel[(heads * heads, batch)](context, mask, mean, cross, *args, BLOCK_D=block_d, **_CROSS_TILES[block_d])
    return gram, cross
