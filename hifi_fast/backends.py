"""Backend dispatch (DESIGN §2, "Dispatch").

Every backend module exposes the same ops with the same signatures: ``head_rows_grad``,
``head_cols_grad`` and ``head_grams`` (see ``hifi_fast.ops``). CUDA tensors use Triton when it
imports; everything else uses PyTorch. ``HIFI_FAST_BACKEND=torch|triton|cuda`` forces one: a forced
backend that cannot run raises, an automatic one that cannot load falls back quietly (logged once).
"""
from __future__ import annotations

import importlib
import logging
import os
from functools import lru_cache
from types import ModuleType

import torch

BACKENDS = ("torch", "triton", "cuda")
_MODULES = {"torch": "hifi_fast.ops", "triton": "hifi_fast.kernels", "cuda": "hifi_fast.cuda_ext"}
logger = logging.getLogger(__name__)


class BackendUnavailableError(RuntimeError):
    """A backend asked for by name cannot run here."""


@lru_cache(maxsize=None)
def load(name: str) -> ModuleType:
    """The module of backend ``name`` (``ImportError`` saying why if it cannot run here)."""
    module = importlib.import_module(_MODULES[name])
    if name != "torch" and not getattr(module, "AVAILABLE", False):
        raise ImportError(getattr(module, "UNAVAILABLE_REASON", f"{name} backend not available"))
    return module


@lru_cache(maxsize=None)
def _warn_fallback(name: str, reason: str) -> None:
    logger.info("hifi_fast: %s backend unavailable (%s); using torch", name, reason)


def forced_backend() -> str | None:
    """The backend named by ``HIFI_FAST_BACKEND``, or ``None``."""
    name = os.environ.get("HIFI_FAST_BACKEND", "").strip().lower()
    if not name:
        return None
    if name not in BACKENDS:
        raise ValueError(f"HIFI_FAST_BACKEND={name!r} is not one of {BACKENDS}")
    return name


def backend_name(device: torch.device) -> str:
    """Which backend runs ops on ``device``."""
    forced = forced_backend()
    if forced is not None:
        if forced != "torch":
            try:
                load(forced)
            except ImportError as err:
                raise BackendUnavailableError(
                    f"HIFI_FAST_BACKEND={forced} was asked for but cannot run: {err}"
                ) from None
            if device.type != "cuda" and not os.environ.get("TRITON_INTERPRET") == "1":
                raise BackendUnavailableError(
                    f"HIFI_FAST_BACKEND={forced} needs CUDA tensors (got {device.type}); "
                    "unset it or use HIFI_FAST_BACKEND=torch"
                )
        return forced
    if device.type == "cuda":
        try:
            load("triton")
            return "triton"
        except ImportError as err:
            _warn_fallback("triton", str(err))
    return "torch"


def available_backends(device_type: str) -> list[str]:
    """The backends that can run here on ``device_type`` tensors (``"cpu"`` or ``"cuda"``)."""
    names = ["torch"]
    for name in ("triton", "cuda") if device_type == "cuda" else ():
        try:
            load(name)
            names.append(name)
        except ImportError:
            pass
    return names


def ops_for(tensor: torch.Tensor) -> ModuleType:
    """The module implementing the ops for ``tensor``'s device (the head-slice layer decides its
    backend when it is patched or moved, not per call)."""
    return load(backend_name(tensor.device))
