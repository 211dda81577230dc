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
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as deserialize
from safetensors.torch import save as serialize
from torch import nn

from .._version import __version__
from ..adapters import ROWS, attention_layers, get_adapter, slice_dim
from ..heads import HeadSelection
from ..tuning.modules import SLICE_PARAMS, whole_tensor
from ..tuning.patching import (
    STATE_ATTR, fingerprint_version, is_patched, patch_selection, plan_slices, resolve_modules_to_save, unpatch,
    weights_fingerprint,
)
from .files import atomic_write

CONFIG_NAME = "hifi_config.json"
WEIGHTS_NAME = "hifi_weights.safetensors"
FORMAT_VERSION = 1
REQUIRED_KEYS = ("base_fingerprint", "modules_to_save", "selection")


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
        "dtype": _dtype_name(next(model.parameters()).dtype),
    }


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def tensor_names(model: nn.Module) -> dict[int, str]:
    """Each parameter's name in a checkpoint: the first ``named_parameters`` gives it (a tied weight,
    e.g. a causal LM's ``lm_head`` and its embedding, is one tensor under one name)."""
    return {id(param): name for name, param in model.named_parameters()}


def _checkpoint_tensors(model: nn.Module, modules_to_save: list[str]) -> dict[str, torch.Tensor]:
    """What a checkpoint of the patched ``model`` holds, by name: the slices and the parameters of
    ``modules_to_save``, whatever their ``requires_grad`` says now; FSDP2 shards are gathered whole
    (so every rank must call)."""
    modules = dict(model.named_modules())
    saved = {id(param) for name in modules_to_save for param in modules[name].parameters()}
    return {name: whole_tensor(p).detach().contiguous() for name, p in model.named_parameters()
            if id(p) in saved or name.rsplit(".", 1)[-1] in SLICE_PARAMS}


def save(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Save the patched model's compact slices and task head (not the base model) to ``directory``.

    Under FSDP call it on every rank: the shards are gathered (a collective) and every rank writes
    the same files atomically."""

    state = getattr(model, STATE_ATTR, None)
    if state is None:
        wrapped = is_patched(getattr(model, "module", None))  # DDP and the like: the patched model is .module
        raise ValueError("save: model is not patched by hifi_fast (" + (
            "it wraps one: save model.module" if wrapped else "call hifi_fast.patch first") + ")")
    identity = _model_identity(model)
    base_dtype = state.base_dtype and _dtype_name(state.base_dtype)
    if base_dtype and identity["dtype"] != base_dtype:
        raise ValueError(
            f"save: the model was patched in {base_dtype} and cast to {identity['dtype']} since, so no model "
            f"could load this checkpoint (its base weights are checked as they were when patched). Cast it "
            f"back (model.to(torch.{base_dtype})) and save, or cast before patching (HiFiConfig(master_dtype=...) "
            "keeps the slices in a wider dtype)"
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "format_version": FORMAT_VERSION,
        "hifi_fast_version": __version__,
        **identity,
        "base_fingerprint": state.base_fingerprint,
        "modules_to_save": state.modules_to_save,
        "master_dtype": state.master_dtype and _dtype_name(state.master_dtype),
        "selection": state.selection.to_dict(),
    }
    tensors = _checkpoint_tensors(model, state.modules_to_save)
    weights = serialize({name: t.cpu() for name, t in tensors.items()}, metadata={"format": "pt"})
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
    missing = [key for key in REQUIRED_KEYS if key not in config]
    if missing:
        raise CheckpointMismatchError(f"{path} is damaged: it has no {', '.join(missing)}")
    master = config.get("master_dtype")
    if master is not None and not isinstance(getattr(torch, str(master), None), torch.dtype):
        raise CheckpointMismatchError(f"{path} is damaged: master_dtype {master!r} is not a torch dtype")
    return config


def _master_dtype(config: dict) -> torch.dtype | None:
    master = config.get("master_dtype")
    return None if master is None else getattr(torch, master)


def check_identity(
    model: nn.Module, config: dict, check_name: bool = True,
    base_fingerprint: Callable[[list[str], int], str] | None = None,
) -> None:
    """Refuse (``CheckpointMismatchError``) a checkpoint ``config`` saved from another base model:
    architecture, sizes, dtype, ``name_or_path`` (if ``check_name``) and the weights fingerprint.

    ``base_fingerprint(modules_to_save, version)``, if given, returns the base model's fingerprint
    of that version (e.g. one kept from when the model was at its base values); default: hash
    ``model``'s weights now, with the fingerprint version the checkpoint was saved with."""
    get_adapter(model)
    ours = _model_identity(model)
    keys = ["model_type", "num_layers", "num_heads", "num_kv_heads", "head_dim", "dtype"]
    if check_name:
        keys.append("base_model_name_or_path")
    diffs = [f"{k}: checkpoint {config.get(k)!r}, model {ours[k]!r}" for k in keys if config.get(k) != ours[k]]
    if diffs:
        raise CheckpointMismatchError("checkpoint is for another base model (" + "; ".join(diffs) + ")")
    fingerprint = base_fingerprint or (lambda exclude, version: weights_fingerprint(model, exclude, version))
    want = config["base_fingerprint"]
    if fingerprint(config["modules_to_save"], fingerprint_version(want)) != want:
        raise CheckpointMismatchError(
            "checkpoint is for another base model: the model's weights differ from those it was trained "
            "from (weights fingerprint mismatch)"
        )


def _check_weights_hash(path: Path, data: bytes, config: dict) -> None:
    """Refuse a weights file that is not the one the config was saved with (checkpoints written
    before the hash was recorded have none and are not checked)."""
    want = config.get("weights_sha256")
    if want is not None and hashlib.sha256(data).hexdigest() != want:
        raise CheckpointMismatchError(
            f"{path} is not the weights file {path.parent / CONFIG_NAME} was saved with (SHA-256 differs): the two "
            "come from different saves, e.g. a save interrupted between writing them; save the model again"
        )


def _read_weights(path: Path, expected: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    # Read once: the bytes that are hashed are the bytes that are loaded, even if a save replaces
    # the file meanwhile (the tensors are small: slices and the task head).
    data = path.read_bytes()
    _check_weights_hash(path, data, config)
    try:
        tensors = deserialize(data)
    except SafetensorError as err:
        raise CheckpointMismatchError(f"{path} is not a readable safetensors file ({err})") from None
    if set(tensors) != set(expected):
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise CheckpointMismatchError(f"{path} does not fit the model: missing {missing}, unexpected {extra}")
    for name, want in expected.items():
        tensor = tensors[name]
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
    check_identity(model, config, check_name)
    selection = HeadSelection.from_dict(config["selection"])
    patch_selection(model, selection, modules_to_save=config["modules_to_save"], master_dtype=_master_dtype(config))
    expected = _checkpoint_tensors(model, config["modules_to_save"])
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


def expected_tensors(
    model: nn.Module, selection: HeadSelection, modules_to_save: list[str] | None = None,
    master_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """The tensors (names, shapes, dtypes; on the meta device) that a checkpoint of ``selection``
    holds for the plain ``model``: what ``patch`` would make trainable, computed without patching.
    Raises ``ValueError`` if the selection or ``modules_to_save`` does not fit the model."""
    slices = plan_slices(model, selection)
    to_save = resolve_modules_to_save(model, modules_to_save)
    modules = dict(model.named_modules())
    expected: dict[str, torch.Tensor] = {}
    for spec in slices:
        module = modules[spec.module_name]
        weight = module.weight if isinstance(module, nn.Linear) else module.weight.t()
        shape = list(weight.shape)
        shape[slice_dim(spec.sliced)] = len(spec.blocks) * spec.block_size
        dtype = master_dtype or weight.dtype
        expected[f"{spec.module_name}.hifi_weight"] = torch.empty(shape, dtype=dtype, device="meta")
        if spec.sliced == ROWS and module.bias is not None:
            expected[f"{spec.module_name}.hifi_bias"] = torch.empty(shape[0], dtype=dtype, device="meta")
    names = tensor_names(model)
    for name in to_save:
        for param in modules[name].parameters():
            expected[names[id(param)]] = torch.empty_like(param, device="meta")
    return expected


def read_checkpoint(
    model: nn.Module, directory: str | os.PathLike, check_name: bool = True,
    base_fingerprint: Callable[[list[str], int], str] | None = None,
) -> tuple[dict, HeadSelection, dict[str, torch.Tensor]]:
    """Read and verify the checkpoint in ``directory`` for the plain ``model`` without touching it:
    ``(config, selection, tensors)``, the tensors named as in the weights file, on the CPU, in
    memory of their own (read from the file once, which may be rewritten later).

    Every check of ``load`` runs (format, base model identity and fingerprint, weights file hash,
    names, shapes and dtypes); ``base_fingerprint`` as in :func:`check_identity`."""
    config = read_config(directory)
    check_identity(model, config, check_name, base_fingerprint)
    selection = HeadSelection.from_dict(config["selection"])
    expected = expected_tensors(model, selection, config["modules_to_save"], _master_dtype(config))
    tensors = _read_weights(Path(directory) / WEIGHTS_NAME, expected, config)
    return config, selection, tensors
