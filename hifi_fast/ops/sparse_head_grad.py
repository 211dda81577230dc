"""Sparse-head weight gradients in plain PyTorch (DESIGN §2, "Sparse-head backward").

Heads are given as ``blocks``: the first feature index of each selected head block of
``block_size`` features. For ``y = x Wᵀ + b`` with only the rows ``S`` of the head blocks trainable,
``∂W_S = ∂y[:, S]ᵀ x`` and ``∂b_S = Σ ∂y[:, S]``; with only the input columns ``S`` trainable (the
output projection), ``∂W[:, S] = ∂yᵀ x[:, S]``. ``grad_out`` and ``inp`` are 2-D ``[N, features]``.
"""
from __future__ import annotations

import torch


def feature_index(blocks: torch.Tensor, block_size: int) -> torch.Tensor:
    """Feature indices ``[len(blocks) * block_size]`` covered by the head blocks, in block order."""
    offsets = torch.arange(block_size, device=blocks.device, dtype=blocks.dtype)
    return (blocks[:, None] + offsets).reshape(-1)


def head_rows_grad(
    grad_out: torch.Tensor, inp: torch.Tensor, blocks: torch.Tensor, block_size: int, with_bias: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(∂W_S [nb*bs, d_in], ∂b_S [nb*bs] or None)`` for head rows ``S`` of a row-sliced projection."""
    return rows_grad_at(grad_out, inp, feature_index(blocks, block_size), with_bias)


def rows_grad_at(
    grad_out: torch.Tensor, inp: torch.Tensor, index: torch.Tensor, with_bias: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``head_rows_grad`` for the output features ``index`` (``feature_index`` of the blocks, which
    the head-slice layer builds once at patch time)."""
    grad_sel = grad_out.index_select(1, index)
    grad_weight = torch.mm(grad_sel.t(), inp)
    grad_bias = grad_sel.sum(0) if with_bias else None  # reduced-precision sums accumulate in fp32
    return grad_weight, grad_bias


def head_cols_grad(
    grad_out: torch.Tensor, inp: torch.Tensor, blocks: torch.Tensor, block_size: int
) -> torch.Tensor:
    """``∂W[:, S]`` ``[d_out, nb*bs]`` for head input columns ``S`` of the output projection."""
    return cols_grad_at(grad_out, inp, feature_index(blocks, block_size))


def cols_grad_at(grad_out: torch.Tensor, inp: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``head_cols_grad`` for the input features ``index`` (built once at patch time)."""
    return torch.mm(grad_out.t(), inp.index_select(1, index))
