"""Vision transformers with separate Q/K/V/O linears: ViT and DeiT (``pixel_values`` inputs).

Two layouts exist across ``transformers`` releases: ``layers.N.attention.{q,k,v,o}_proj`` (5.x) and
``encoder.layer.N.attention.{attention.query, ..., output.dense}`` (4.x); the older one is looked up
when the newer finds nothing.
"""
from __future__ import annotations

from torch import nn

from .base import ArchitectureAdapter, AttentionLayer


class _ViTLegacyLayout(ArchitectureAdapter):
    layer_pattern = r"encoder\.layer\.(\d+)\.attention"
    q, k, v, o = "attention.query", "attention.key", "attention.value", "output.dense"


class ViTAdapter(ArchitectureAdapter):
    """``ViTModel``/``ViTForImageClassification``: the freshly initialised ``classifier`` trains."""

    family = "vit"
    model_types = ("vit",)
    layer_pattern = r"\blayers\.(\d+)\.attention"
    q, k, v, o = "q_proj", "k_proj", "v_proj", "o_proj"
    input_key = "pixel_values"
    task_heads = ("classifier",)
    legacy = _ViTLegacyLayout()

    def layers(self, model: nn.Module) -> list[AttentionLayer]:
        return super().layers(model) or self.legacy.layers(model)


class DeiTAdapter(ViTAdapter):
    """DeiT: ``DeiTForImageClassification`` trains ``classifier``; ``DeiTForImageClassificationWithTeacher``
    trains both of its new heads, ``cls_classifier`` and ``distillation_classifier`` (its logits are
    their mean)."""

    family = "deit"
    model_types = ("deit",)
    task_heads = ("classifier", "cls_classifier", "distillation_classifier")
