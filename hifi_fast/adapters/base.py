"""What an architecture adapter says: where Q/K/V/O live and how heads map to weight slices."""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from ..sparse_head_linear import COLS, ROWS


class UnsupportedModelError(ValueError):
    """The model's architecture has no adapter."""


@dataclass(frozen=True)
class ProjectionSlice:
    """The head blocks of one projection that train.

    ``blocks`` are first feature indices (output features for ``sliced="rows"``, input features for
    ``sliced="cols"``), each covering ``block_size`` features."""

    module_name: str
    sliced: str
    blocks: tuple[int, ...]
    block_size: int


@dataclass(frozen=True)
class AttentionLayer:
    """One attention layer: its projections' module names and its head geometry.

    Either ``qkv`` (one fused projection, output features ``[Q | K | V]``) or all of ``q``, ``k``,
    ``v`` are set."""

    index: int
    o: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None

    def kv_heads(self, heads: list[int]) -> list[int]:
        """Key/value heads read by the query ``heads`` (grouped-query attention shares them)."""
        group = self.num_heads // self.num_kv_heads
        return sorted({h // group for h in heads})

    def slices(self, heads: list[int]) -> list[ProjectionSlice]:
        """The trainable slices of the selected query ``heads`` (DESIGN §1.6)."""
        d = self.head_dim
        q_blocks = tuple(h * d for h in heads)
        kv_blocks = tuple(g * d for g in self.kv_heads(heads))
        out = [ProjectionSlice(self.o, COLS, q_blocks, d)]
        if self.qkv is not None:
            k_start, v_start = self.num_heads * d, (self.num_heads + self.num_kv_heads) * d
            fused = q_blocks + tuple(k_start + b for b in kv_blocks) + tuple(v_start + b for b in kv_blocks)
            return [ProjectionSlice(self.qkv, ROWS, fused, d)] + out
        return [
            ProjectionSlice(self.q, ROWS, q_blocks, d),
            ProjectionSlice(self.k, ROWS, kv_blocks, d),
            ProjectionSlice(self.v, ROWS, kv_blocks, d),
        ] + out


class ArchitectureAdapter:
    """Finds the attention layers of one family of models.

    Subclasses set ``model_types`` (``config.model_type`` values), ``layer_pattern`` (regex on module
    names with the layer index as group 1), the projection names relative to that module, the config
    attributes holding the head counts, ``task_heads`` (top-level modules trained in full) and
    ``input_key``, the batch entry the scoring pass feeds the model (``"pixel_values"``: images,
    every token valid)."""

    family: str = ""
    model_types: tuple[str, ...] = ()
    layer_pattern: str = ""
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None
    o: str = ""
    heads_attr: str = "num_attention_heads"
    kv_heads_attr: str | None = None
    task_heads: tuple[str, ...] = ()
    input_key: str = "input_ids"

    def check(self, model: nn.Module) -> None:
        """Raise ``UnsupportedModelError`` for a model of this family that cannot be patched as is."""

    def head_config(self, model: nn.Module):
        """The config holding the head counts."""
        return model.config

    def layers(self, model: nn.Module) -> list[AttentionLayer]:
        """The model's attention layers, in order."""
        config = self.head_config(model)
        num_heads = getattr(config, self.heads_attr)
        num_kv_heads = getattr(config, self.kv_heads_attr, None) if self.kv_heads_attr else None
        num_kv_heads = num_kv_heads or num_heads
        pattern = re.compile(self.layer_pattern)
        found: dict[int, str] = {}
        for name, _ in model.named_modules():
            match = pattern.search(name)
            if match and match.end() == len(name):
                found[int(match.group(1))] = name
        layers = []
        modules = dict(model.named_modules())
        for index in sorted(found):
            prefix = found[index] + "."
            names = {part: prefix + getattr(self, part) for part in ("q", "k", "v", "qkv", "o") if getattr(self, part)}
            first = modules[names.get("qkv", names.get("q"))]
            out_features = first.weight.shape[0] if isinstance(first, nn.Linear) else first.weight.shape[1]
            head_dim = out_features // (num_heads + (2 * num_kv_heads if "qkv" in names else 0))
            layers.append(AttentionLayer(index, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, **names))
        return layers

    def default_modules_to_save(self, model: nn.Module) -> list[str]:
        """The task head modules present on ``model`` (trained in full by default)."""
        children = dict(model.named_children())
        return [name for name in self.task_heads if name in children]
