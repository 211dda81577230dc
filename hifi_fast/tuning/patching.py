"""``patch`` / ``unpatch``: make only the selected heads' slices (and the task head) trainable."""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..adapters import GENERAL, ProjectionSlice, attention_layers, describe, get_adapter
from ..heads import HeadSelection
from .modules import HeadSliceMixin, convert, whole_tensor

STATE_ATTR = "hifi_state"
logger = logging.getLogger(__name__)


@dataclass
class HiFiState:
    """What ``patch`` did to a model, kept on it as ``model.hifi_state``."""

    selection: HeadSelection
    slices: list[ProjectionSlice]
    modules_to_save: list[str]
    base_fingerprint: str
    master_dtype: torch.dtype | None = None
    requires_grad: dict[str, bool] = field(repr=False, default_factory=dict)
    base_dtype: torch.dtype | None = None  # the model's dtype when patched (``base_fingerprint``'s)


def is_patched(model: nn.Module) -> bool:
    return getattr(model, STATE_ATTR, None) is not None


FINGERPRINT_VERSION = 2
_CHECKSUM_CHUNK = 1 << 22  # elements widened to int64 at a time (32 MiB on the tensor's device)
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _checksums(tensor: torch.Tensor) -> torch.Tensor:
    """``[sum, position-weighted sum]`` of the tensor's raw bits as wrapping int64, computed on its
    own device in chunks: integer sums are exact and order-free, so every device gives the same
    numbers, and no copy of the tensor leaves its device."""
    flat = tensor.detach().reshape(-1)
    bits = flat.view(_BITS[flat.element_size()])
    sums = torch.zeros(2, dtype=torch.int64, device=flat.device)
    for start in range(0, bits.numel(), _CHECKSUM_CHUNK):
        chunk = bits[start:start + _CHECKSUM_CHUNK].to(torch.int64)
        position = torch.arange(start, start + chunk.numel(), device=flat.device, dtype=torch.int64) % 65521 + 1
        sums += torch.stack([chunk.sum(), (chunk * position).sum()])
    return sums


def fingerprint_version(fingerprint: str) -> int:
    """Which ``weights_fingerprint`` version produced ``fingerprint`` (1: before versions were named)."""
    prefix, _, rest = fingerprint.partition(":")
    return int(prefix[1:]) if rest and prefix.startswith("v") and prefix[1:].isdigit() else 1


def weights_fingerprint(model: nn.Module, exclude_prefixes: Iterable[str] = (),
                        version: int = FINGERPRINT_VERSION) -> str:
    """A hash of every parameter's name, shape, dtype and values, skipping ``exclude_prefixes`` (the
    task head, which a fresh model initialises at random).

    Version 2 (``"v2:..."``) hashes two integer checksums per parameter computed on the parameter's
    device (an 8B model on a GPU is fingerprinted without copying it to the host); version 1, kept to
    check older checkpoints, hashed every byte on the CPU."""
    if version not in (1, 2):
        raise ValueError(f"unknown weights fingerprint version {version}; this hifi_fast knows 1 and 2")
    prefixes = tuple(p + "." for p in exclude_prefixes)
    digest = hashlib.blake2b(digest_size=16)
    named = [(name, whole_tensor(param)) for name, param in model.named_parameters()
             if not name.startswith(prefixes) and not name.rsplit(".", 1)[-1].startswith("hifi_")]
    for name, param in named:
        digest.update(f"{name}:{tuple(param.shape)}:{param.dtype};".encode())
        if version == 1:
            tensor = param.detach().contiguous().cpu()
            digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    if version == 1:
        return digest.hexdigest()
    if named:  # one transfer of 2 numbers per parameter
        sums = torch.stack([_checksums(param).cpu() for _, param in named])
        digest.update(sums.numpy().tobytes())
    return f"v2:{digest.hexdigest()}"


def plan_slices(model: nn.Module, selection: HeadSelection) -> list[ProjectionSlice]:
    """The projection slices ``selection`` trains, after checking it fits ``model``."""
    layers = attention_layers(model)
    num_heads = layers[0].num_heads
    for layer, heads in selection.heads.items():
        if layer >= len(layers):
            raise ValueError(f"selection names layer {layer}, but the model has layers 0..{len(layers) - 1}")
        bad = [h for h in heads if h >= num_heads]
        if bad:
            raise ValueError(f"selection names heads {bad} of layer {layer}, but the model has heads 0..{num_heads - 1}")
    return [s for layer, heads in selection.heads.items() for s in layers[layer].slices(heads)]


def resolve_modules_to_save(model: nn.Module, names: list[str] | None) -> list[str]:
    """``names`` checked against the model, or the architecture's task head when ``None``."""
    if names is None:
        return get_adapter(model).default_modules_to_save(model)
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules or n == ""]
    if missing:
        raise ValueError(f"modules_to_save names {missing}, which the model does not have")
    return list(names)


def patch_selection(
    model: nn.Module,
    selection: HeadSelection,
    modules_to_save: list[str] | None = None,
    master_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Make only the ``selection``'s Q/K/V/O slices and the task head trainable, in place
    (``hifi_fast.patch`` selects the heads first when given a ``HiFiConfig``).

    Args:
        model: a supported ``transformers`` model (see ``hifi_fast.SUPPORTED_MODEL_TYPES``).
        selection: the heads that train.
        modules_to_save: modules trained in full; default: the task head.
        master_dtype: dtype of the trainable slices; default: the model's.

    Returns:
        ``model``, patched: its trainable parameters are the slices (``*.hifi_weight``,
        ``*.hifi_bias``) and the task head.
    """
    if is_patched(model):
        raise ValueError("model is already patched by hifi_fast; call hifi_fast.unpatch(model) first")
    if not isinstance(selection, HeadSelection):
        raise TypeError(f"patch: selection must be a HeadSelection or HiFiConfig, got {type(selection).__name__}")
    if master_dtype is not None and not (isinstance(master_dtype, torch.dtype) and master_dtype.is_floating_point):
        raise TypeError(f"patch: master_dtype must be a floating torch.dtype (e.g. torch.float32) or None, got {master_dtype!r}")
    slices = plan_slices(model, selection)
    if get_adapter(model) is GENERAL:
        logger.warning("hifi_fast: %s is patched by the general adapter; what it found:\n%s",
                       type(model).__name__, describe(model))
    to_save = resolve_modules_to_save(model, modules_to_save)
    fingerprint = weights_fingerprint(model, to_save)

    modules = dict(model.named_modules())
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    for param in model.parameters():
        param.requires_grad_(False)
    try:
        for spec in slices:
            convert(modules[spec.module_name], spec, master_dtype)
    except BaseException:  # e.g. out of memory for the compact slices: leave the model as it was
        _undo_patch(model, requires_grad)
        raise
    for name in to_save:
        modules[name].requires_grad_(True)
    base_dtype = next(model.parameters()).dtype
    setattr(model, STATE_ATTR, HiFiState(selection, slices, to_save, fingerprint, master_dtype, requires_grad, base_dtype))
    return model


def _undo_patch(model: nn.Module, requires_grad: dict[str, bool]) -> None:
    """Remove the slices and restore the ``requires_grad`` flags recorded before patching."""
    for module in model.modules():
        if isinstance(module, HeadSliceMixin):
            module.detach_slices()
    for name, param in model.named_parameters():
        param.requires_grad_(requires_grad.get(name, True))


def unpatch(model: nn.Module) -> nn.Module:
    """Write the trained slices into the base weights and remove every trace of hifi_fast; returns
    the plain ``transformers`` model (the "merge", free by construction)."""
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        raise ValueError("model is not patched by hifi_fast; nothing to unpatch")
    _undo_patch(model, state.requires_grad)
    delattr(model, STATE_ATTR)
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, all)``; the compact slices are copies of base weights, so "all" is the base
    model's size."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for n, p in model.named_parameters() if not n.rsplit(".", 1)[-1].startswith("hifi_"))
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    """Print ``trainable params: N || all params: M || trainable%: P`` (peft's format)."""
    trainable, total = count_parameters(model)
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")
