"""``y = x Wᵀ + b`` whose only trainable parts are head slices of ``W`` (DESIGN §2).

The forward is the base model's one GEMM on the base weight, which holds the current slice values
(the slice is a view of it, or a compact copy written into it after it changed; ``modules.py``).
The backward returns the dense input gradient and the compact gradient of the slice only: no
full-size weight gradient ever exists. Where the weight is a copy that the module does not own
(FSDP's all-gathered parameters), the slices are merged into a temporary copy instead, in the
forward and again in the backward.

The backward is the math and nothing else: what it computes is decided at patch time
(``SlicePlan``). A slice that is one run of adjacent rows is one GEMM on a view of the output
gradient; a compact slice of several head blocks is gathered once (``index_select`` + one GEMM on
CPU, one launch of the Triton kernel or the CUDA extension on a GPU). Eagerly that choice, the
backend and their fixed arguments are bound once per module (``eager_slice_grads``) and the
backward makes one call, with no ``torch.library`` wrapper; where the slice gradients are ATen
ops (a view's, or the torch backend's), the eager path is the same ops in a C++ autograd node
(``native.py``), which costs the host less per call than any Python Function; under ``torch.compile`` the
PyTorch form is traced inline on CPU, and on a GPU the backend runs as the custom ops
``hifi_fast::head_rows_grad`` / ``hifi_fast::head_cols_grad`` (fake implementations: no graph break).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from types import SimpleNamespace
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .. import ops as torch_ops
from ..adapters import COLS, slice_dim
from ..backends import load, ops_for
from . import native


def runs_of(blocks: tuple[int, ...], block_size: int) -> tuple[tuple[int, int], ...]:
    """``(first feature, features)`` of each maximal range of adjacent blocks, in block order."""
    runs: list[list[int]] = []
    for start in blocks:
        if runs and runs[-1][0] + runs[-1][1] == start:
            runs[-1][1] += block_size
        else:
            runs.append([start, block_size])
    return tuple((start, length) for start, length in runs)


@dataclass(frozen=True)
class SlicePlan:
    """What the backward of one projection computes, fixed at patch time.

    ``view``: ``(first feature, features)`` when the slice is that one run of rows taken in place
    (its gradient is a GEMM on a view), ``None`` for a compact slice gathered through the block
    index; ``with_bias``: the rows' bias entries train too."""

    sliced: str
    block_size: int
    with_bias: bool
    view: tuple[int, int] | None = None


class SliceIndex(NamedTuple):
    """The device side of a ``SlicePlan``: ``blocks`` (``[nb]`` first feature of each head block),
    ``index`` (their ``nb * bs`` features, ``ops.feature_index``) and the name of the backend that
    computes a compact slice's gradient on that device; made at patch time and whenever the module
    moves (``backends.backend_name``)."""

    blocks: torch.Tensor
    index: torch.Tensor
    backend: str


# The slice gradients of each kind of plan, from 2-D ``grad_out`` and ``x`` in one dtype; the fixed
# arguments first, so that the eager path binds them once at patch time (``eager_slice_grads``).
def _run_rows_grads(start: int, length: int, with_bias: bool, grad_out, x):
    grad_rows = grad_out.narrow(1, start, length)
    grad_weight = torch.mm(grad_rows.t(), x)
    return (grad_weight, grad_rows.sum(0)) if with_bias else (grad_weight,)


def _index_rows_grads(index, with_bias: bool, grad_out, x):
    grad_weight, grad_bias = torch_ops.rows_grad_at(grad_out, x, index, with_bias)
    return (grad_weight, grad_bias) if with_bias else (grad_weight,)


def _index_cols_grads(index, grad_out, x):
    return (torch_ops.cols_grad_at(grad_out, x, index),)


def _backend_rows_grads(run, blocks, block_size: int, with_bias: bool, grad_out, x):
    grad_weight, grad_bias = run(grad_out, x, blocks, block_size, with_bias)
    return (grad_weight, grad_bias) if with_bias else (grad_weight,)


def _backend_cols_grads(run, blocks, block_size: int, grad_out, x):
    return (run(grad_out, x, blocks, block_size),)


def _grads_for(plan: SlicePlan, blocks: torch.Tensor, index: torch.Tensor, backend) -> Callable:
    """The slice-gradient function of ``plan`` as a ``partial`` of 2-D ``(grad_out, x)``: a GEMM on a
    view for one run of rows; for a compact slice, the PyTorch form (``index_select`` + GEMM) or one
    call of ``backend``'s op (one launch on a GPU)."""
    if plan.view is not None:
        return partial(_run_rows_grads, *plan.view, plan.with_bias)
    if backend is torch_ops:
        if plan.sliced == COLS:
            return partial(_index_cols_grads, index)
        return partial(_index_rows_grads, index, plan.with_bias)
    if plan.sliced == COLS:
        return partial(_backend_cols_grads, backend.head_cols_grad, blocks, plan.block_size)
    return partial(_backend_rows_grads, backend.head_rows_grad, blocks, plan.block_size, plan.with_bias)


def _as_2d(grad_out: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``grad_out`` and ``x`` as ``[N, features]``, ``x`` in the gradient's dtype: under autocast the
    saved input keeps its own dtype while the gradient is in the autocast dtype; the slice gradients
    are taken in the gradient's dtype (autograd casts them to the slices' dtype, e.g. fp32 master
    slices)."""
    grad_out = grad_out.reshape(-1, grad_out.shape[-1])
    x = x.reshape(-1, x.shape[-1])
    return grad_out, x if x.dtype == grad_out.dtype else x.to(grad_out.dtype)


def slice_grads(plan: SlicePlan, grad_out: torch.Tensor, x: torch.Tensor, blocks: torch.Tensor,
                index: torch.Tensor, backend: str) -> tuple[torch.Tensor, ...]:
    """The gradient of the weight slice (and of the bias slice) from ``grad_out [..., d_out]`` and
    the projection's input ``x [..., d_in]``. Compiling, a CPU graph traces the PyTorch form inline
    and a GPU graph calls the custom ops, which dispatch to the backend when the graph runs."""
    if torch.compiler.is_compiling():
        module = torch_ops if grad_out.device.type == "cpu" else _CUSTOM_OPS
    else:
        module = load(backend)
    return _grads_for(plan, blocks, index, module)(*_as_2d(grad_out, x))


def eager_slice_grads(plan: SlicePlan, indices: SliceIndex) -> Callable[[torch.Tensor, torch.Tensor], tuple]:
    """``slice_grads`` of ``plan`` on ``indices``' device with every choice made now (the branch,
    the backend, the fixed arguments), for the eager path."""
    return _grads_for(plan, indices.blocks, indices.index, load(indices.backend))


def native_args(plan: SlicePlan, indices: SliceIndex, slices: tuple[torch.Tensor, ...]) -> tuple | None:
    """The fixed leading arguments of the C++ node (``native.py``) for ``plan`` on ``indices``' device,
    or ``None`` where the eager path is the Python Function: no C++ node here, or a compact slice
    whose gradient a GPU backend (Triton, the CUDA extension) computes in one launch."""
    if plan.view is None and indices.backend != "torch":
        return None
    extension = native.extension()
    if extension is None:
        return None
    if plan.view is not None:
        kind, (start, length) = extension.ROWS_RUN, plan.view
    else:
        kind, start, length = (extension.COLS_INDEX if plan.sliced == COLS else extension.ROWS_INDEX), 0, 0
    return (slices[0], slices[1] if len(slices) > 1 else None, indices.index, kind, start, length)


def merged(weight: torch.Tensor, bias: torch.Tensor | None, plan: SlicePlan, index: torch.Tensor,
           slices: tuple[torch.Tensor, ...]):
    """``(weight, bias)`` copies holding the slice values (``slices``: weight slice, bias slice)."""
    weight = weight.detach().index_copy(slice_dim(plan.sliced), index, slices[0].detach().to(weight.dtype))
    if plan.with_bias and bias is not None:
        bias = bias.detach().index_copy(0, index, slices[1].detach().to(bias.dtype))
    return weight, bias


def _input_grad(grad_out: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return grad_out.matmul(weight if weight.dtype == grad_out.dtype else weight.to(grad_out.dtype))


class HeadSliceLinearFunction(torch.autograd.Function):
    """Autograd Function of ``sparse_head_linear`` when compiling (or under functorch transforms):
    the weight holds the slice values, the slices only carry gradients."""

    @staticmethod
    def forward(ctx, x, weight, bias, plan, indices, *slices):
        ctx.save_for_backward(x, weight)
        ctx.plan, ctx.indices = plan, indices
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x = _input_grad(grad_out, weight) if ctx.needs_input_grad[0] else None
        return (grad_x, None, None, None, None, *slice_grads(ctx.plan, grad_out, x, *ctx.indices))


class EagerHeadSliceLinearFunction(torch.autograd.Function):
    """The same on the eager hot path, where the host's time per call is the cost: the slice
    gradients are one ``eager_slice_grads`` function fixed at patch time, called once."""

    @staticmethod
    def forward(ctx, x, weight, bias, grads, *slices):
        ctx.save_for_backward(x, weight)
        ctx.grads = grads
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x = _input_grad(grad_out, weight) if ctx.needs_input_grad[0] else None
        return (grad_x, None, None, None, *ctx.grads(*_as_2d(grad_out, x)))


class MergingHeadSliceLinearFunction(torch.autograd.Function):
    """``sparse_head_linear`` where the weight does not hold the slice values (FSDP's gathered
    copies): they are merged into a temporary copy, in the forward and again in the backward. The
    base weight and the slices are saved rather than the merged copy: FSDP gathers the weight again
    for the backward, and the copy lives only while it is used."""

    @staticmethod
    def forward(ctx, x, weight, bias, plan, indices, *slices):
        ctx.save_for_backward(x, weight, *slices)
        ctx.plan, ctx.indices = plan, indices
        return F.linear(x, *merged(weight, bias, plan, indices.index, slices))

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, *slices = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = _input_grad(grad_out, merged(weight, None, ctx.plan, ctx.indices.index, tuple(slices))[0])
        return (grad_x, None, None, None, None, *slice_grads(ctx.plan, grad_out, x, *ctx.indices))


def sparse_head_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    slices: tuple[torch.Tensor, ...],
    plan: SlicePlan,
    indices: SliceIndex,
    merge: bool = False,
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` with gradients flowing to the head slices only.

    Args:
        weight: ``[d_out, d_in]`` frozen base weight, holding the current slice values unless ``merge``.
        slices: the trainable weight slice (``[nb*bs, d_in]`` rows or ``[d_out, nb*bs]`` columns) and,
            with ``plan.with_bias``, the bias slice ``[nb*bs]``.
        indices: the ``SliceIndex`` of the plan on the tensors' device.
        merge: ``weight``/``bias`` do not hold the slice values (FSDP's gathered copies): merge them
            into temporary copies.
    """
    if merge:
        if not torch.is_grad_enabled():
            return F.linear(x, *merged(weight, bias, plan, indices.index, slices))
        return MergingHeadSliceLinearFunction.apply(x, weight, bias, plan, indices, *slices)
    if not torch.is_grad_enabled():
        return F.linear(x, weight, bias)
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return HeadSliceLinearFunction.apply(x, weight, bias, plan, indices, *slices)
    return apply_eagerly(x, weight, bias, eager_slice_grads(plan, indices), *slices)


# ``Function.apply``'s Python wrapper only matters for functorch transforms and for dynamo, which
# recognises it by name; eagerly and outside them it costs a third of the call (a pytree walk of the
# arguments), so the hot path calls the C implementation underneath it directly.
apply_eagerly = getattr(super(torch.autograd.Function, EagerHeadSliceLinearFunction), "apply",
                        EagerHeadSliceLinearFunction.apply)


@torch.library.custom_op("hifi_fast::head_rows_grad", mutates_args=())
def head_rows_grad(
    grad_out: torch.Tensor, inp: torch.Tensor, blocks: torch.Tensor, block_size: int, with_bias: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(∂W_S, ∂b_S)`` on the dispatched backend, for compiled graphs; ``∂b_S`` is empty when
    ``with_bias`` is false."""
    grad_weight, grad_bias = ops_for(grad_out).head_rows_grad(grad_out, inp, blocks, block_size, with_bias)
    return grad_weight, grad_bias if grad_bias is not None else grad_out.new_empty(0)


@head_rows_grad.register_fake
def _(grad_out, inp, blocks, block_size, with_bias):
    width = blocks.shape[0] * block_size
    return grad_out.new_empty(width, inp.shape[1]), grad_out.new_empty(width if with_bias else 0)


@torch.library.custom_op("hifi_fast::head_cols_grad", mutates_args=())
def head_cols_grad(grad_out: torch.Tensor, inp: torch.Tensor, blocks: torch.Tensor, block_size: int) -> torch.Tensor:
    """``∂W[:, S]`` on the dispatched backend, for compiled graphs."""
    return ops_for(grad_out).head_cols_grad(grad_out, inp, blocks, block_size)


@head_cols_grad.register_fake
def _(grad_out, inp, blocks, block_size):
    return grad_out.new_empty(grad_out.shape[1], blocks.shape[0] * block_size)


# What compiled graphs on a GPU call for a compact slice's gradient (``slice_grads``).
_CUSTOM_OPS = SimpleNamespace(head_rows_grad=torch.ops.hifi_fast.head_rows_grad,
                              head_cols_grad=torch.ops.hifi_fast.head_cols_grad)
