"""Architecture adapters: one small module per family, looked up by ``config.model_type``; a model
type no family lists goes to the general adapter (``general.py``), which patches it exactly or
refuses it."""
from __future__ import annotations

from torch import nn

from .base import (
    COLS, GROUPED, ROWS, STACKED, ArchitectureAdapter, AttentionLayer, ProjectionSlice, UnsupportedModelError, features,
    slice_dim,
)
from .bert import BertAdapter, DistilBertAdapter
from .clip import CLIPAdapter, CLIPTextAdapter, CLIPVisionAdapter
from .decoders import (
    GemmaAdapter, GptOssAdapter, GPTJAdapter, LlamaLikeAdapter, MoEAdapter, OLMo2Adapter, OPTAdapter, Phi3Adapter, PhiAdapter,
)
from .encoders import (
    AlbertAdapter, BigBirdAdapter, DebertaV2Adapter, ModernBertAdapter, MPNetAdapter,
)
from .general import GeneralAdapter
from .gpt2 import GPT2Adapter
from .llama import LlamaAdapter
from .neox import GPTNeoXAdapter
from .seq2seq import DECODER_MASK, BartAdapter, T5Adapter
from .vit import DeiTAdapter, ViTAdapter

ADAPTERS: tuple[ArchitectureAdapter, ...] = (
    BertAdapter(), DistilBertAdapter(), GPT2Adapter(), LlamaAdapter(),
    GemmaAdapter(), MoEAdapter(), GptOssAdapter(), OLMo2Adapter(), LlamaLikeAdapter(), PhiAdapter(), Phi3Adapter(), GPTNeoXAdapter(),
    OPTAdapter(), GPTJAdapter(),
    DebertaV2Adapter(), ModernBertAdapter(), MPNetAdapter(), BigBirdAdapter(), AlbertAdapter(),
    T5Adapter(), BartAdapter(),
    ViTAdapter(), DeiTAdapter(), CLIPVisionAdapter(), CLIPTextAdapter(), CLIPAdapter(),
)
SUPPORTED_MODEL_TYPES = tuple(t for a in ADAPTERS for t in a.model_types)
GENERAL = GeneralAdapter()


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
    """The family adapter for ``model``; for a model type outside the table, the general adapter if
    it maps the model exactly; else a clear error naming the supported model types and, for the
    general adapter, the module that did not fit and what was expected."""
    _refuse_fused_multihead_attention(model)
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            adapter.check(model)
            return adapter
    try:
        GENERAL.check(model)
    except UnsupportedModelError as err:
        raise UnsupportedModelError(
            f"hifi_fast does not support {type(model).__name__} (model_type={model_type!r}); "
            f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}; the general adapter, tried for other "
            f"model types, refused it: {err}"
        ) from None
    return GENERAL


def attention_layers(model: nn.Module) -> list[AttentionLayer]:
    """The attention layers of a supported model (error if none are found)."""
    layers = get_adapter(model).layers(model)
    if not layers:
        raise UnsupportedModelError(f"found no attention layers in {type(model).__name__}")
    return layers


def describe(model: nn.Module) -> str:
    """What hifi_fast sees in ``model``: the adapter that matched (a family's, or the general one),
    the head geometry, and each layer's projections with their shapes and the trainable slice of
    head 0. Raises ``UnsupportedModelError`` (with the reason) for a model it cannot patch."""
    adapter = get_adapter(model)
    layers = attention_layers(model)
    modules = dict(model.named_modules())
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    how = ("the general adapter (model type not in hifi_fast's family table; matched by module names and shapes)"
           if adapter is GENERAL else f"the {adapter.family!r} family adapter")
    first = layers[0]
    lines = [
        f"{type(model).__name__} (model_type={model_type!r}): {how}",
        f"{len(layers)} attention layers x {first.num_heads} query heads ({first.num_kv_heads} key/value heads), "
        f"head_dim {first.head_dim}; task heads trained in full: {adapter.default_modules_to_save(model) or 'none'}",
    ]
    for layer in layers:
        parts = []
        for role, name in layer.projections().items():
            fan_in, fan_out = features(modules[name])
            layout = f", {layer.qkv_layout}" if role == "qkv" else ""
            parts.append(f"{role}={name} [{fan_in}->{fan_out}{layout}]")
        lines.append(f"  layer {layer.index}: " + ", ".join(parts))
    head0 = ", ".join(f"{s.module_name.rsplit('.', 1)[-1]} {s.sliced} {list(s.blocks)}x{s.block_size}"
                      for s in first.slices([0]))
    lines.append(f"  head 0 of layer {first.index} trains: {head0}")
    return "\n".join(lines)


__all__ = [
    "ADAPTERS", "COLS", "DECODER_MASK", "GENERAL", "GROUPED", "ROWS", "STACKED", "SUPPORTED_MODEL_TYPES", "ArchitectureAdapter",
    "AttentionLayer", "ProjectionSlice", "UnsupportedModelError", "attention_layers", "describe", "get_adapter", "slice_dim",
]
