"""The compiled CUDA extension as a backend (``HIFI_FAST_BACKEND=cuda``; DESIGN §2, "Dispatch").

Same op names and signatures as ``hifi_fast.ops`` (the PyTorch reference). The sparse-head weight
gradients run in ``hifi_fast._cuda`` (``csrc/``: one tiled CUDA launch per projection, head blocks
read in place, fp32 accumulation); ``AVAILABLE`` says whether that extension imports here and
``UNAVAILABLE_REASON`` says why not. The extension is optional: ``setup.py`` builds it only where a
CUDA-enabled torch and a CUDA toolkit are present at install time.

fp32 inputs are computed in full fp32 FMAs (never TF32, like PyTorch's default matmul); fp16/bf16
inputs accumulate in fp32 and round once to the input dtype. The ops take CUDA tensors only (the
extension checks and says what is wrong otherwise); the dispatcher (``hifi_fast.backends``) only
sends CUDA tensors here.
"""
from __future__ import annotations

import importlib
import importlib.util

import torch

from . import kernels as _triton
from . import ops as _torch_ops

_BUILD_HINT = (
    "install with `pip install --no-build-isolation -e .` on a machine with a CUDA torch and a "
    "CUDA toolkit (HIFI_FAST_FORCE_CUDA_BUILD=1 makes the build fail loudly instead of skipping it)"
)


def _import_extension():
    """``(module, None)`` or ``(None, reason)``."""
    if importlib.util.find_spec("hifi_fast._cuda") is None:
        return None, f"hifi_fast._cuda is not built: {_BUILD_HINT}"
    try:
        return importlib.import_module("hifi_fast._cuda"), None
    except ImportError as err:  # built, but against another torch/CUDA (e.g. undefined symbols)
        return None, f"hifi_fast._cuda is built but does not load ({err}): rebuild it; {_BUILD_HINT}"


_cuda, UNAVAILABLE_REASON = _import_extension()
AVAILABLE = _cuda is not None

# The extension only accelerates the sparse-head backward. The scoring Grams run on the Triton
# kernel where Triton imports (the automatic GPU backend), else on the PyTorch reference.
head_grams = _triton.head_grams if _triton.AVAILABLE else _torch_ops.head_grams


def _extension():
    if _cuda is None:
        raise RuntimeError(UNAVAILABLE_REASON)
    return _cuda


def _index(blocks: torch.Tensor) -> torch.Tensor:
    """The block starts as the int64 vector the extension takes (other integer dtypes converted on
    their own device; anything else is left for the extension to reject with a clear message)."""
    if blocks.dtype == torch.int64 or blocks.dtype.is_floating_point or blocks.dtype.is_complex:
        return blocks
    return blocks.long()


def head_rows_grad(
    grad_out: torch.Tensor, inp: torch.Tensor, blocks: torch.Tensor, block_size: int, with_bias: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(∂W_S [nb*bs, d_in], ∂b_S [nb*bs] or None)`` for head rows ``S`` of a row-sliced projection.

    Args:
        grad_out: ``[N, d_out]`` CUDA gradient of the projection's output (any strides;
            fp32/fp16/bf16/fp64).
        inp: ``[N, d_in]`` the projection's input, same device and dtype.
        blocks: ``[nb]`` integer first feature index of each selected head block in ``d_out``, on
            the same device.
        block_size: features per head block (``d_h``; any size).
        with_bias: also return the bias gradient (fused into the same launch).

    Returns:
        Gradients in ``grad_out``'s dtype, accumulated in fp32 (fp64 for fp64), in one launch.
    """
    ext = _extension()
    grad_weight, grad_bias = ext.head_rows_grad(grad_out, inp, _index(blocks), int(block_size), bool(with_bias))
    return grad_weight, (grad_bias if with_bias else None)


def head_cols_grad(
    grad_out: torch.Tensor, inp: torch.Tensor, blocks: torch.Tensor, block_size: int
) -> torch.Tensor:
    """``∂W[:, S]`` ``[d_out, nb*bs]`` for head input columns ``S`` of the output projection.

    Args:
        grad_out: ``[N, d_out]`` CUDA gradient of the projection's output (any strides).
        inp: ``[N, d_in]`` the projection's input, same device and dtype; ``blocks`` index its features.
        blocks: ``[nb]`` integer first feature index of each selected head block in ``d_in``.
        block_size: features per head block (``d_h``; any size).

    Returns:
        The gradient in ``grad_out``'s dtype, accumulated in fp32 (fp64 for fp64), in one launch.
    """
    return _extension().head_cols_grad(grad_out, inp, _index(blocks), int(block_size))


__all__ = ["AVAILABLE", "UNAVAILABLE_REASON", "head_cols_grad", "head_grams", "head_rows_grad"]
