"""Sparse-head weight gradients in Triton (DESIGN §2, "Sparse-head backward").

Same ops and semantics as ``hifi_fast.ops.sparse_head_grad``: for ``y = x Wᵀ + b`` with only the
head rows ``S`` trainable, ``∂W_S = ∂y[:, S]ᵀ x`` and ``∂b_S = Σ ∂y[:, S]``; with only the head input
columns ``S`` trainable (the output projection), ``∂W[:, S] = ∂yᵀ x[:, S]``.

Both are ``out = Aᵀ B`` reduced over the ``N`` tokens, where ``A`` is the operand whose columns are
restricted to the head blocks (read in place through ``blocks``, never gathered) and ``B`` is dense.
One kernel serves both: the column gradient is the transpose of ``x[:, S]ᵀ ∂y``, so it is the same
kernel storing its tile through swapped output strides. Accumulation is fp32 (``tl.dot``).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.runtime import driver

# The interpreter's tl.dot reads bf16 as its raw uint16 bits; feed it fp32 there. On a GPU the
# operands go to the tensor cores in their own dtype.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")

if _INTERPRET:  # benchmarking configs is meaningless (and slow) in the interpreter
    _CONFIGS = [triton.Config({"BLOCK_N": 32, "BLOCK_K": 32})]
else:
    _CONFIGS = [
        triton.Config({"BLOCK_N": block_n, "BLOCK_K": block_k}, num_warps=warps, num_stages=stages)
        for block_n, block_k, warps, stages in [
            (32, 32, 4, 3), (64, 32, 4, 3), (32, 64, 4, 3), (64, 64, 4, 3),
            (32, 128, 4, 3), (64, 128, 8, 3), (128, 64, 8, 3), (128, 128, 8, 2),
        ]
    ]


def _configs_that_fit(configs: list, named_args: dict, **meta) -> list:
    """The autotune configs whose compiled kernel fits the device's shared memory per block.

    Each config is compiled here (Triton caches it, so the launch or the benchmark reuses it) and
    kept only if its shared memory is within the device's limit: e.g. fp32 tiles of 128 x 128 with
    two stages need 263 KB, more than any GPU has (A100 163 KB, H100 227 KB). Without this the
    autotuner would launch such a config and rely on swallowing the launch error."""
    device = driver.active.get_current_device()
    limit = driver.active.utils.get_device_properties(device)["max_shared_mem"]
    kernel = _head_block_grad_kernel.fn
    meta = {k: v for k, v in meta.items() if k not in ("grid", "warmup")}  # the autotuner's launch options
    fits = [c for c in configs
            if kernel.warmup(**named_args, **meta, **c.all_kwargs(), grid=(1,)).metadata.shared <= limit]
    if not fits:
        raise RuntimeError(
            f"no tile configuration of the sparse-head gradient kernel fits this device's {limit} bytes of shared "
            f"memory per block (dtype {named_args['head_ptr'].dtype}); use HIFI_FAST_BACKEND=torch"
        )
    return fits


# ``num_blocks`` is only an autotune key: fewer head blocks mean fewer programs, which favours
# narrower tiles. The precision and the bias change the compiled kernel, so each is tuned apart.
@triton.autotune(configs=_CONFIGS, key=["num_blocks", "d_dense", "block_size", "INPUT_PRECISION", "WITH_BIAS"],
                 prune_configs_by={"early_config_prune": _configs_that_fit})
@triton.jit
def _head_block_grad_kernel(
    head_ptr, dense_ptr, out_ptr, bias_ptr, blocks_ptr,
    n_rows, d_dense, block_size, num_blocks,
    stride_head_n, stride_head_f, stride_dense_n, stride_dense_f, stride_out_r, stride_out_c,
    WITH_BIAS: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One program: a ``BLOCK_M`` slice of one head block times a ``BLOCK_K`` tile of the dense
    features, reduced over all ``n_rows`` tokens. Output row ``r`` of head block ``b`` is
    ``b * block_size + r``; the bias (row sums of the head operand) is written by tile 0."""
    tiles_per_block = tl.cdiv(block_size, BLOCK_M)
    block = tl.program_id(0) // tiles_per_block
    rows = (tl.program_id(0) % tiles_per_block) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < block_size
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    col_ok = cols < d_dense
    tokens = tl.arange(0, BLOCK_N)

    feature = tl.load(blocks_ptr + block) + rows  # the head block's features, read in place
    # Pointers advance by whole token tiles (64-bit pointer arithmetic: no int32 overflow at large N).
    head_ptrs = head_ptr + tokens[:, None] * stride_head_n + feature[None, :] * stride_head_f
    dense_ptrs = dense_ptr + tokens[:, None] * stride_dense_n + cols[None, :] * stride_dense_f

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start in range(0, n_rows, BLOCK_N):
        token_ok = (start + tokens) < n_rows
        a = tl.load(head_ptrs, mask=token_ok[:, None] & row_ok[None, :], other=0.0)
        b = tl.load(dense_ptrs, mask=token_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=INPUT_PRECISION)
        if WITH_BIAS:
            bias_acc += tl.sum(a.to(tl.float32), axis=0)
        head_ptrs += BLOCK_N * stride_head_n
        dense_ptrs += BLOCK_N * stride_dense_n

    out_rows = block * block_size + rows
    out_ptrs = out_ptr + out_rows[:, None] * stride_out_r + cols[None, :] * stride_out_c
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
    if WITH_BIAS:
        if tl.program_id(1) == 0:
            tl.store(bias_ptr + out_rows, bias_acc.to(bias_ptr.dtype.element_ty), mask=row_ok)


def _row_tile(block_size: int) -> int:
    """Rows of a head block per program: the largest power of two dividing ``block_size`` (so the
    tiles cover e.g. d_h = 80 or 96 with no padding), clamped to tl.dot's 16 and a register-friendly 64."""
    return min(64, max(16, block_size & -block_size))


def _input_precision(dtype: torch.dtype) -> str:
    """fp32 operands use TF32 only when PyTorch's own matmuls would (the reference's semantics)."""
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what tl.dot takes with an fp32 accumulator


def _check(grad_out: torch.Tensor, inp: torch.Tensor, blocks: torch.Tensor) -> None:
    if grad_out.dim() != 2 or inp.dim() != 2 or grad_out.shape[0] != inp.shape[0]:
        raise ValueError(
            f"expected grad_out [N, d_out] and inp [N, d_in], got {tuple(grad_out.shape)} and {tuple(inp.shape)}"
        )
    if grad_out.dtype != inp.dtype or grad_out.dtype not in _DTYPES:
        raise ValueError(
            f"grad_out and inp must share one of the dtypes {_DTYPES}, got {grad_out.dtype} and {inp.dtype}"
        )
    if blocks.dim() != 1 or blocks.dtype.is_floating_point or blocks.device != grad_out.device:
        raise ValueError(
            f"blocks must be a 1-D integer tensor on {grad_out.device}, "
            f"got {blocks.dtype} {tuple(blocks.shape)} on {blocks.device}"
        )


def _head_block_grad(
    head: torch.Tensor, dense: torch.Tensor, blocks: torch.Tensor, block_size: int,
    out: torch.Tensor, out_strides: tuple[int, int], bias: torch.Tensor | None,
) -> None:
    """Launch the kernel: ``out[b*bs + r, c] = Σ_n head[n, blocks[b] + r] · dense[n, c]`` (stored
    through ``out_strides``), and ``bias[b*bs + r] = Σ_n head[n, blocks[b] + r]`` when given."""
    n_rows, d_dense = dense.shape
    num_blocks = blocks.numel()
    block_m = _row_tile(block_size)
    tiles = num_blocks * triton.cdiv(block_size, block_m)
    if tiles == 0:
        return
    # At least one column tile: tile 0 also writes the bias, even when there are no columns.
    grid = lambda meta: (tiles, max(1, triton.cdiv(d_dense, meta["BLOCK_K"])))  # noqa: E731
    _head_block_grad_kernel[grid](
        head, dense, out, out if bias is None else bias, blocks,
        n_rows, d_dense, block_size, num_blocks,
        head.stride(0), head.stride(1), dense.stride(0), dense.stride(1), *out_strides,
        WITH_BIAS=bias is not None, UPCAST=_INTERPRET, INPUT_PRECISION=_input_precision(head.dtype),
        BLOCK_M=block_m,
    )


def head_rows_grad(
    grad_out: torch.Tensor, inp: torch.Tensor, blocks: torch.Tensor, block_size: int, with_bias: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(∂W_S [nb*bs, d_in], ∂b_S [nb*bs] or None)`` for head rows ``S`` of a row-sliced projection.

    Args:
        grad_out: ``[N, d_out]`` gradient of the projection's output (any strides).
        inp: ``[N, d_in]`` the projection's input, same dtype.
        blocks: ``[nb]`` integer first feature index of each selected head block in ``d_out``.
        block_size: features per head block (``d_h``; need not be a power of two).
        with_bias: also return the bias gradient.

    Returns:
        Gradients in ``grad_out``'s dtype, accumulated in fp32, in one kernel launch.
    """
    _check(grad_out, inp, blocks)
    rows = blocks.numel() * block_size
    grad_weight = torch.empty(rows, inp.shape[1], device=inp.device, dtype=grad_out.dtype)
    grad_bias = torch.empty(rows, device=inp.device, dtype=grad_out.dtype) if with_bias else None
    _head_block_grad(grad_out, inp, blocks, block_size, grad_weight, grad_weight.stride(), grad_bias)
    return grad_weight, grad_bias


def head_cols_grad(
    grad_out: torch.Tensor, inp: torch.Tensor, blocks: torch.Tensor, block_size: int
) -> torch.Tensor:
    """``∂W[:, S]`` ``[d_out, nb*bs]`` for head input columns ``S`` of the output projection.

    Args:
        grad_out: ``[N, d_out]`` gradient of the projection's output (any strides).
        inp: ``[N, d_in]`` the projection's input, same dtype; ``blocks`` index its features.
        blocks: ``[nb]`` integer first feature index of each selected head block in ``d_in``.
        block_size: features per head block (``d_h``; need not be a power of two).

    Returns:
        The gradient in ``grad_out``'s dtype, accumulated in fp32, in one kernel launch.
    """
    _check(grad_out, inp, blocks)
    cols = blocks.numel() * block_size
    grad_weight = torch.empty(grad_out.shape[1], cols, device=inp.device, dtype=grad_out.dtype)
    # Computed as (x[:, S]ᵀ ∂y)ᵀ: the kernel's head rows are the columns of grad_weight.
    transposed = (grad_weight.stride(1), grad_weight.stride(0))
    _head_block_grad(inp, grad_out, blocks, block_size, grad_weight, transposed, None)
    return grad_weight
