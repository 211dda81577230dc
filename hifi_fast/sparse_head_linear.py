"""``y = x Wᵀ + b`` whose only trainable parts are head slices of ``W`` (DESIGN §2).

The forward is the base model's one GEMM on the base weight, which already holds the current slice
values. The backward returns the dense input gradient and the compact gradient of the slices only:
no full-size weight gradient ever exists. Where the weight is a copy that the module does not own
(FSDP's all-gathered parameters), the slices are merged into a temporary copy instead, in the
forward and again in the backward.

The weight-gradient ops are ``torch.library`` custom ops (``hifi_fast::head_rows_grad``,
``hifi_fast::head_cols_grad``) with fake implementations, so ``torch.compile`` traces through the
layer without a graph break while the backend dispatch stays eager.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .backends import ops_for

ROWS = "rows"  # head blocks are output features (Q, K, V, fused QKV)
COLS = "cols"  # head blocks are input features (the output projection)


def slice_dim(sliced: str) -> int:
    """The dimension of the ``[d_out, d_in]`` weight that the head slices index."""
    return 0 if sliced == ROWS else 1


@torch.library.custom_op("hifi_fast::head_rows_grad", mutates_args=())
def head_rows_grad(
    grad_out: torch.Tensor, inp: torch.Tensor, blocks: torch.Tensor, block_size: int, with_bias: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(∂W_S, ∂b_S)`` on the dispatched backend; ``∂b_S`` is empty when ``with_bias`` is false."""
    grad_weight, grad_bias = ops_for(grad_out).head_rows_grad(grad_out, inp, blocks, block_size, with_bias)
    return grad_weight, grad_bias if grad_bias is not None else grad_out.new_empty(0)


@head_rows_grad.register_fake
def _(grad_out, inp, blocks, block_size, with_bias):
    width = blocks.shape[0] * block_size
    return grad_out.new_empty(width, inp.shape[1]), grad_out.new_empty(width if with_bias else 0)


@torch.library.custom_op("hifi_fast::head_cols_grad", mutates_args=())
def head_cols_grad(grad_out: torch.Tensor, inp: torch.Tensor, blocks: torch.Tensor, block_size: int) -> torch.Tensor:
    """``∂W[:, S]`` on the dispatched backend."""
    return ops_for(grad_out).head_cols_grad(grad_out, inp, blocks, block_size)


@head_cols_grad.register_fake
def _(grad_out, inp, blocks, block_size):
    return grad_out.new_empty(grad_out.shape[1], blocks.shape[0] * block_size)


class SparseHeadLinearFunction(torch.autograd.Function):
    """Autograd Function of ``sparse_head_linear``; ``slice_weight``/``slice_bias`` only carry the
    gradient (their values are read through ``weight``)."""

    @staticmethod
    def forward(ctx, x, weight, bias, slice_weight, slice_bias, blocks, block_size, sliced, merge_index):
        # Merging, the base weight and the slice are saved rather than the merged copy: FSDP
        # gathers the weight again for the backward, and the copy lives only while it is used.
        ctx.save_for_backward(x, weight, blocks, *((slice_weight, merge_index) if merge_index is not None else (None, None)))
        ctx.block_size, ctx.sliced = block_size, sliced
        return F.linear(x, *merged(weight, bias, slice_weight, slice_bias, sliced, merge_index))

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, blocks, slice_weight, merge_index = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            weight = merged(weight, None, slice_weight, None, ctx.sliced, merge_index)[0]
            grad_x = grad_out.matmul(weight.to(grad_out.dtype))
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
        # Under autocast the saved input keeps its own dtype while the gradient is in the autocast
        # dtype; the slice gradients are taken in the gradient's dtype (autograd casts them to the
        # slices' dtype, e.g. fp32 master slices).
        x_2d = x.reshape(-1, x.shape[-1]).to(grad_out.dtype)
        grad_slice_bias = None
        if ctx.sliced == ROWS:
            with_bias = ctx.needs_input_grad[4]
            grad_slice, grad_slice_bias = head_rows_grad(grad_2d, x_2d, blocks, ctx.block_size, with_bias)
            grad_slice_bias = grad_slice_bias if with_bias else None
        else:
            grad_slice = head_cols_grad(grad_2d, x_2d, blocks, ctx.block_size)
        return grad_x, None, None, grad_slice, grad_slice_bias, None, None, None, None


def merged(weight, bias, slice_weight, slice_bias, sliced, merge_index):
    """``(weight, bias)`` with the slice values written into copies at ``merge_index``, or as they
    are when ``merge_index`` is ``None`` (they already hold the slices)."""
    if merge_index is None:
        return weight, bias
    weight = weight.detach().index_copy(slice_dim(sliced), merge_index, slice_weight.detach().to(weight.dtype))
    if slice_bias is not None:
        bias = bias.detach().index_copy(0, merge_index, slice_bias.detach().to(bias.dtype))
    return weight, bias


def sparse_head_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    slice_weight: torch.Tensor,
    slice_bias: torch.Tensor | None,
    blocks: torch.Tensor,
    block_size: int,
    sliced: str,
    merge_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` with gradients flowing to the head slices only.

    Args:
        weight: ``[d_out, d_in]`` frozen base weight, holding the current slice values.
        slice_weight: trainable ``[nb*bs, d_in]`` (``sliced="rows"``) or ``[d_out, nb*bs]``
            (``sliced="cols"``).
        slice_bias: trainable ``[nb*bs]`` bias entries of the rows, or ``None``.
        blocks: ``[nb]`` first feature of each head block; ``block_size``: features per block.
        merge_index: ``None`` when ``weight`` holds the slice values; otherwise the ``[nb*bs]``
            features of the slices, which are then merged into temporary copies of ``weight``/``bias``.
    """
    if not torch.is_grad_enabled() or not (x.requires_grad or slice_weight.requires_grad):
        return F.linear(x, *merged(weight, bias, slice_weight, slice_bias, sliced, merge_index))
    return SparseHeadLinearFunction.apply(x, weight, bias, slice_weight, slice_bias, blocks, block_size, sliced,
                                          merge_index)
