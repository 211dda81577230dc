"""Architecture adapters: one small module per family, looked up by ``config.model_type``."""
from __future__ import annotations

from torch import nn

from .base import ArchitectureAdapter, AttentionLayer, ProjectionSlice
from .bert import BertAdapter, DistilBertAdapter
from .gpt2 import GPT2Adapter
from .llama import LlamaAdapter

ADAPTERS: tuple[ArchitectureAdapter, ...] = (BertAdapter(), DistilBertAdapter(), GPT2Adapter(), LlamaAdapter())
SUPPORTED_MODEL_TYPES = tuple(t for a in ADAPTERS for t in a.model_types)


class UnsupportedModelError(ValueError):
    """The model's architecture has no adapter."""


def get_adapter(model: nn.Module) -> ArchitectureAdapter:
    """The adapter for ``model``, or a clear error naming the supported model types."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise UnsupportedModelError(
        f"hifi_fast does not support {type(model).__name__} (model_type={model_type!r}); "
        f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
    )


def attention_layers(model: nn.Module) -> list[AttentionLayer]:
    """The attention layers of a supported model (error if none are found)."""
    layers = get_adapter(model).layers(model)
    if not layers:
        raise UnsupportedModelError(f"found no attention layers in {type(model).__name__}")
    return layers


__all__ = [
    "ADAPTERS", "SUPPORTED_MODEL_TYPES", "ArchitectureAdapter", "AttentionLayer", "ProjectionSlice",
    "UnsupportedModelError", "attention_layers", "get_adapter",
]
