"""HiFi checkpoints: ``hifi_config.json`` + ``hifi_weights.safetensors`` (compact slices and task head).

``load`` checks everything (format, architecture, sizes, dtype, base weights) before it touches the
model, so a refused checkpoint leaves the model as it was. ``save`` writes each file under a temporary
name and renames it, weights first; the config, renamed last, records the weights file's SHA-256.
So a save killed at any point leaves the old checkpoint, the new one, or (killed between the two
renames) a new weights file beside the old config, which ``load`` refuses by its hash: never a
silent mix of two saves.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as serialize
from torch import nn

from .adapters import attention_layers, get_adapter
from .files import atomic_write
from .modules import whole_tensor
from .patching import STATE_ATTR, is_patched, patch, unpatch, weights_fingerprint
from .selection import HeadSelection

CONFIG_NAME = "hifi_config.json"
WEIGHTS_NAME = "hifi_weights.safetensors"
FORMAT_VERSION = 1


class CheckpointMismatchError(ValueError):
    """A checkpoint does not belong to the model it is loaded into, or is damaged."""


def _model_identity(model: nn.Module) -> dict:
    layers = attention_layers(model)
    config = model.config
    return {
        "model_type": config.model_type,
        "base_model_name_or_path": getattr(config, "_name_or_path", "") or "",
        "num_layers": len(layers),
        "num_heads": layers[0].num_heads,
        "num_kv_heads": layers[0].num_kv_heads,
        "head_dim": layers[0].head_dim,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
    }


def _trainable_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable tensors by name; FSDP2 shards are gathered whole (so every rank must call)."""
    return {name: whole_tensor(p).detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def save(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Save the patched model's compact slices and task head (not the base model) to ``directory``.

    Under FSDP call it on every rank: the shards are gathered (a collective) and every rank writes
    the same files atomically."""
    from . import __version__

    state = getattr(model, STATE_ATTR, None)
    if state is None:
        raise ValueError("save: model is not patched by hifi_fast (call hifi_fast.patch first)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "format_version": FORMAT_VERSION,
        "hifi_fast_version": __version__,
        **_model_identity(model),
        "base_fingerprint": state.base_fingerprint,
        "modules_to_save": state.modules_to_save,
        "master_dtype": None if state.master_dtype is None else str(state.master_dtype).replace("torch.", ""),
        "selection": state.selection.to_dict(),
    }
    weights = serialize({name: t.cpu() for name, t in _trainable_tensors(model).items()}, metadata={"format": "pt"})
    config["weights_sha256"] = hashlib.sha256(weights).hexdigest()
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: Path(tmp).write_bytes(weights))
    atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))
    return directory


def read_config(directory: str | os.PathLike) -> dict:
    """The ``hifi_config.json`` of a checkpoint, with a clear error if it is missing or damaged."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no HiFi checkpoint in {directory}: {CONFIG_NAME} is missing")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointMismatchError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(config, dict) or config.get("format_version") != FORMAT_VERSION:
        raise CheckpointMismatchError(f"{path} is not a hifi_fast checkpoint of format {FORMAT_VERSION}")
    return config


def _check_identity(model: nn.Module, config: dict, check_name: bool) -> None:
    get_adapter(model)
    ours = _model_identity(model)
    keys = ["model_type", "num_layers", "num_heads", "num_kv_heads", "head_dim", "dtype"]
    if check_name:
        keys.append("base_model_name_or_path")
    diffs = [f"{k}: checkpoint {config.get(k)!r}, model {ours[k]!r}" for k in keys if config.get(k) != ours[k]]
    if diffs:
        raise CheckpointMismatchError("checkpoint is for another base model (" + "; ".join(diffs) + ")")
    if weights_fingerprint(model, config["modules_to_save"]) != config["base_fingerprint"]:
        raise CheckpointMismatchError(
            "checkpoint is for another base model: the model's weights differ from those it was trained "
            "from (weights fingerprint mismatch)"
        )


def _check_weights_hash(path: Path, config: dict) -> None:
    """Refuse a weights file that is not the one the config was saved with (checkpoints written
    before the hash was recorded have none and are not checked)."""
    want = config.get("weights_sha256")
    if want is None:
        return
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != want:
        raise CheckpointMismatchError(
            f"{path} is not the weights file {path.parent / CONFIG_NAME} was saved with (SHA-256 differs): the two "
            "come from different saves, e.g. a save interrupted between writing them; save the model again"
        )


def _read_weights(path: Path, expected: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    _check_weights_hash(path, config)
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = set(handle.keys())
            if keys != set(expected):
                missing, extra = sorted(set(expected) - keys), sorted(keys - set(expected))
                raise CheckpointMismatchError(f"{path} does not fit the model: missing {missing}, unexpected {extra}")
            tensors = {k: handle.get_tensor(k) for k in expected}
    except SafetensorError as err:
        raise CheckpointMismatchError(f"{path} is not a readable safetensors file ({err})") from None
    for name, tensor in tensors.items():
        want = expected[name]
        if tensor.shape != want.shape or tensor.dtype != want.dtype:
            raise CheckpointMismatchError(
                f"{path}: {name} is {tuple(tensor.shape)} {tensor.dtype}, the model needs "
                f"{tuple(want.shape)} {want.dtype}"
            )
    return tensors


def load(model: nn.Module, directory: str | os.PathLike, check_name: bool = True) -> nn.Module:
    """Patch a fresh base ``model`` with the checkpoint in ``directory`` and load its values.

    Refuses, with ``CheckpointMismatchError`` and the model untouched, a checkpoint saved from another
    base model (architecture, size, dtype, weights, or ``name_or_path`` unless ``check_name=False``).
    """
    if is_patched(model):
        raise ValueError("load: model is already patched; load into a fresh base model")
    config = read_config(directory)
    _check_identity(model, config, check_name)
    selection = HeadSelection.from_dict(config["selection"])
    master = config.get("master_dtype")
    patch(model, selection, modules_to_save=config["modules_to_save"], master_dtype=master and getattr(torch, master))
    expected = _trainable_tensors(model)
    try:
        tensors = _read_weights(Path(directory) / WEIGHTS_NAME, expected, config)
    except BaseException:
        unpatch(model)
        raise
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in tensors:
                param.copy_(tensors[name])
    return model
