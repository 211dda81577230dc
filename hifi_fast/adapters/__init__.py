"""Architecture adapters: one small module per family, looked up by ``config.model_type``."""
from __future__ import annotations

from torch import nn

from .base import ArchitectureAdapter, AttentionLayer, ProjectionSlice, UnsupportedModelError
from .bert import BertAdapter, DistilBertAdapter
from .clip import CLIPAdapter, CLIPTextAdapter, CLIPVisionAdapter
from .gpt2 import GPT2Adapter
from .llama import LlamaAdapter
from .vit import DeiTAdapter, ViTAdapter

ADAPTERS: tuple[ArchitectureAdapter, ...] = (
    BertAdapter(), DistilBertAdapter(), GPT2Adapter(), LlamaAdapter(),
    ViTAdapter(), DeiTAdapter(), CLIPVisionAdapter(), CLIPTextAdapter(), CLIPAdapter(),
)
SUPPORTED_MODEL_TYPES = tuple(t for a in ADAPTERS for t in a.model_types)


def _refuse_fused_multihead_attention(model: nn.Module) -> None:
    """``nn.MultiheadAttention`` keeps Q/K/V in one ``in_proj_weight`` that no adapter slices."""
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            where = f"module {name!r}" if name else "the model itself"
            raise UnsupportedModelError(
                f"hifi_fast does not support {type(model).__name__}: {where} is a torch.nn.MultiheadAttention, "
                "whose Q/K/V share one fused in_proj_weight; hifi_fast patches Hugging Face attention "
                f"with separate Q/K/V/O projections (or GPT-2's fused Conv1D); supported model types: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )


def get_adapter(model: nn.Module) -> ArchitectureAdapter:
    """The adapter for ``model``, or a clear error naming the supported model types."""
    _refuse_fused_multihead_attention(model)
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            adapter.check(model)
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
