"""CLIP towers (separate ``q_proj``/``k_proj``/``v_proj``/``out_proj`` linears).

Task heads: only a freshly initialised ``classifier`` (``CLIPForImageClassification``) trains by
default. ``visual_projection``/``text_projection`` are pretrained: they map each tower into the
embedding space the two towers share, and a model from ``from_pretrained`` already holds them, so
training them is an explicit choice (``modules_to_save=["visual_projection"]``), not a default. By
default a projection model trains its selected heads only, and its checkpoint holds only slices.

``CLIPModel`` (both towers, each with its own layer and head counts) is refused: scores, selections
and checkpoints describe one attention geometry. Patch ``model.vision_model`` and/or
``model.text_model`` instead: each is a supported tower, patched, saved and unpatched on its own.
"""
from __future__ import annotations

from torch import nn

from .base import ArchitectureAdapter, UnsupportedModelError


class CLIPVisionAdapter(ArchitectureAdapter):
    """``CLIPVisionModel``, ``CLIPVisionModelWithProjection`` (``pixel_values`` inputs)."""

    family = "clip_vision"
    model_types = ("clip_vision_model",)
    layer_pattern = r"^(?:vision_model\.)?encoder\.layers\.(\d+)\.self_attn"
    q, k, v, o = "q_proj", "k_proj", "v_proj", "out_proj"
    input_key = "pixel_values"


class CLIPTextAdapter(CLIPVisionAdapter):
    """``CLIPTextModel``, ``CLIPTextModelWithProjection`` (``input_ids``/``attention_mask`` inputs)."""

    family = "clip_text"
    model_types = ("clip_text_model",)
    layer_pattern = r"^(?:text_model\.)?encoder\.layers\.(\d+)\.self_attn"
    input_key = "input_ids"


class CLIPAdapter(CLIPVisionAdapter):
    """``model_type="clip"``: ``CLIPForImageClassification`` (vision tower + ``classifier``);
    ``CLIPModel`` is refused (see the module docstring)."""

    family = "clip"
    model_types = ("clip",)
    task_heads = ("classifier",)

    def head_config(self, model: nn.Module):
        return model.config.vision_config

    def check(self, model: nn.Module) -> None:
        if not hasattr(model, "text_model"):
            return
        vision, text = model.config.vision_config, model.config.text_config
        raise UnsupportedModelError(
            f"hifi_fast does not patch {type(model).__name__} as a whole: its two towers have their own "
            f"geometry (vision: {vision.num_hidden_layers} layers x {vision.num_attention_heads} heads, "
            f"text: {text.num_hidden_layers} layers x {text.num_attention_heads} heads) and HiFi scores, "
            "selects and saves one geometry at a time. Patch model.vision_model (clip_vision_model) and/or "
            "model.text_model (clip_text_model): each tower is supported on its own"
        )
