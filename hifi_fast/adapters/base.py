"""What an architecture adapter says: where Q/K/V/O live and how heads map to weight slices."""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn
from transformers.pytorch_utils import Conv1D

# Layouts of a fused Q/K/V projection's output features (``AttentionLayer.qkv_layout``).
STACKED = "stacked"  # [Q | K | V]: all query heads, then all key heads, then all value heads (GPT-2, Phi-3, ModernBERT)
GROUPED = "grouped"  # per KV group g: [g's query heads | k_g | v_g] (GPT-NeoX: one head per group, [q_h k_h v_h])
QKV_LAYOUTS = (STACKED, GROUPED)
PROJECTION_TYPES = (nn.Linear, Conv1D)  # exactly these classes: hifi_fast.tuning.modules converts them in place


ROWS = "rows"  # head blocks are output features (Q, K, V, fused QKV)
COLS = "cols"  # head blocks are input features (the output projection)


def slice_dim(sliced: str) -> int:
    """The dimension of the ``[d_out, d_in]`` weight that the head slices index."""
    return 0 if sliced == ROWS else 1


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

    Either ``qkv`` (one fused projection whose output features are laid out as ``qkv_layout`` says)
    or all of ``q``, ``k``, ``v`` are set. ``extra_rows``: further projections whose output features
    are ``num_heads`` blocks of ``head_dim``, one per query head, in head order (DeBERTa's
    ``pos_key_proj``/``pos_query_proj``); a head's rows there train with it. ``mask``: the batch entry
    whose mask covers this layer's tokens (``"decoder_attention_mask"`` for the decoder layers of
    an encoder-decoder). ``applications``: how many times the module runs in one forward (ALBERT's
    shared layers); scoring averages its heads' statistics over them."""

    index: int
    o: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None
    qkv_layout: str = STACKED
    extra_rows: tuple[str, ...] = ()
    mask: str = "attention_mask"
    applications: int = 1

    def kv_heads(self, heads: list[int]) -> list[int]:
        """Key/value heads read by the query ``heads`` (grouped-query attention shares them)."""
        group = self.num_heads // self.num_kv_heads
        return sorted({h // group for h in heads})

    def projections(self) -> dict[str, str]:
        """``{role: module name}`` of every projection of this layer (roles ``q k v qkv o`` and
        ``extra0``, ``extra1``...)."""
        names = {role: getattr(self, role) for role in ("q", "k", "v", "qkv", "o") if getattr(self, role)}
        names.update({f"extra{i}": name for i, name in enumerate(self.extra_rows)})
        return names

    def slices(self, heads: list[int]) -> list[ProjectionSlice]:
        """The trainable slices of the selected query ``heads`` (DESIGN §1.6)."""
        d = self.head_dim
        q_blocks = tuple(h * d for h in heads)
        kv_groups = self.kv_heads(heads)
        kv_blocks = tuple(g * d for g in kv_groups)
        out = [ProjectionSlice(self.o, COLS, q_blocks, d)]
        out += [ProjectionSlice(name, ROWS, q_blocks, d) for name in self.extra_rows]
        if self.qkv is not None:
            return [ProjectionSlice(self.qkv, ROWS, self._fused_blocks(heads, kv_groups), d)] + out
        return [
            ProjectionSlice(self.q, ROWS, q_blocks, d),
            ProjectionSlice(self.k, ROWS, kv_blocks, d),
            ProjectionSlice(self.v, ROWS, kv_blocks, d),
        ] + out

    def _fused_blocks(self, heads: list[int], kv_groups: list[int]) -> tuple[int, ...]:
        d, h, kv = self.head_dim, self.num_heads, self.num_kv_heads
        if self.qkv_layout == STACKED:
            k_start, v_start = h * d, (h + kv) * d
            return (tuple(q * d for q in heads) + tuple(k_start + g * d for g in kv_groups)
                    + tuple(v_start + g * d for g in kv_groups))
        group = h // kv  # GROUPED: group g holds its `group` query heads, then k_g, then v_g
        stride = (group + 2) * d
        blocks = {(q // group) * stride + (q % group) * d for q in heads}
        for g in kv_groups:
            blocks |= {g * stride + group * d, g * stride + (group + 1) * d}
        return tuple(sorted(blocks))


def features(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a ``nn.Linear`` or transformers' ``Conv1D`` (``[in, out]``)."""
    weight = module.weight
    return (weight.shape[1], weight.shape[0]) if isinstance(module, nn.Linear) else (weight.shape[0], weight.shape[1])


def verify_layer(layer: AttentionLayer, modules: dict[str, nn.Module], what: str) -> None:
    """Raise ``UnsupportedModelError`` unless every projection of ``layer`` is a plain ``nn.Linear``
    (or ``Conv1D``) of exactly the shape its head geometry implies; ``what`` names the adapter (the
    messages' prefix; empty: none)."""
    what = f"{what}: " if what else ""
    h, kv, d = layer.num_heads, layer.num_kv_heads, layer.head_dim
    if h < 1 or kv < 1 or h % kv:
        raise UnsupportedModelError(f"{what}layer {layer.index} has {h} query heads and {kv} key/value heads; "
                                    "hifi_fast needs the query heads to be a whole multiple of the key/value heads")
    if layer.qkv_layout not in QKV_LAYOUTS:
        raise UnsupportedModelError(f"{what}unknown fused Q/K/V layout {layer.qkv_layout!r} (known: {QKV_LAYOUTS})")
    expected = {"q": h * d, "k": kv * d, "v": kv * d, "qkv": (h + 2 * kv) * d}
    for role, name in layer.projections().items():
        module = modules.get(name)
        if module is None:
            raise UnsupportedModelError(f"{what}layer {layer.index} has no module {name!r} (its {role} projection)")
        patched = hasattr(module, "hifi_plan") and isinstance(module, PROJECTION_TYPES)  # hifi_fast.tuning.modules' classes
        if type(module) not in PROJECTION_TYPES and not patched:
            raise UnsupportedModelError(
                f"{what}{name!r} (the {role} projection of layer {layer.index}) is a {type(module).__name__}; "
                "hifi_fast patches plain torch.nn.Linear (or transformers' Conv1D) projections only")
        fan_in, fan_out = features(module)
        if role == "o":
            if fan_in != h * d:
                raise UnsupportedModelError(
                    f"{what}{name!r} (the output projection of layer {layer.index}) reads {fan_in} input features; "
                    f"expected {h} heads x {d} = {h * d}")
        elif fan_out != expected.get(role, h * d):
            want = expected.get(role, h * d)
            heads = {"k": kv, "v": kv}.get(role, h)
            detail = f"({h} + 2 x {kv} heads) x {d}" if role == "qkv" else f"{heads} heads x {d}"
            raise UnsupportedModelError(
                f"{what}{name!r} (the {role} projection of layer {layer.index}) has {fan_out} output features; "
                f"expected {detail} = {want}")


def _modules_named(model: nn.Module, pattern: str) -> list[tuple[str, re.Match]]:
    """``(name, match)`` of the modules whose full name ends with a match of ``pattern``."""
    regex = re.compile(pattern)
    return [(name, match) for name, _ in model.named_modules()
            if (match := regex.search(name)) and match.end() == len(name)]


class ArchitectureAdapter:
    """Finds the attention layers of one family of models.

    Subclasses set ``model_types`` (``config.model_type`` values), ``layer_pattern`` (regex on module
    names with the layer index as group 1), the projection names relative to that module, the config
    attributes holding the head counts, ``task_heads`` (top-level modules trained in full) and
    ``input_key``, the batch entry the scoring pass feeds the model (``"pixel_values"``: images,
    every token valid). ``pads_inputs``: the model pads the token axis on the right itself, to a
    multiple of its block (BigBird's block-sparse attention), and the scoring pass counts
    those tokens as padding. ``layers`` checks every projection's class and shape against the head
    geometry (``verify_layer``): a model whose projections do not match is refused, never patched
    approximately."""

    family: str = ""
    model_types: tuple[str, ...] = ()
    layer_pattern: str = ""
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None
    o: str = ""
    extra_rows: tuple[str, ...] = ()
    qkv_layout: str = STACKED
    heads_attr: str = "num_attention_heads"
    kv_heads_attr: str | None = None
    task_heads: tuple[str, ...] = ()
    input_key: str = "input_ids"
    pads_inputs: bool = False
    # Cross-attention modules a model of this family can have that the adapter does not map (BERT's
    # and GPT-2's with ``add_cross_attention=True``): refused rather than left out silently.
    unmapped_cross_attention: str = ""

    def check(self, model: nn.Module) -> None:
        """Raise ``UnsupportedModelError`` for a model of this family that cannot be patched as is."""
        unmapped = _modules_named(model, self.unmapped_cross_attention) if self.unmapped_cross_attention else []
        if unmapped:
            name = unmapped[0][0]
            raise UnsupportedModelError(
                f"hifi_fast does not patch {type(model).__name__}: it has cross-attention layers ({name!r}; "
                f"add_cross_attention=True), which {self.describe_name()} does not map, so HiFi would score and "
                "train its self-attention only; cross-attention is supported in the encoder-decoder families "
                "(T5, BART and the like)")

    def head_config(self, model: nn.Module):
        """The config holding the head counts."""
        return model.config

    def num_heads(self, model: nn.Module) -> int:
        return getattr(self.head_config(model), self.heads_attr)

    def num_kv_heads(self, model: nn.Module) -> int:
        kv = getattr(self.head_config(model), self.kv_heads_attr, None) if self.kv_heads_attr else None
        return kv or self.num_heads(model)

    def layout(self, model: nn.Module) -> str:
        """The fused Q/K/V layout (``STACKED`` or ``GROUPED``), for adapters with ``qkv``."""
        return self.qkv_layout

    def layers(self, model: nn.Module) -> list[AttentionLayer]:
        """The model's attention layers, in order."""
        return self.find_layers(model, self.layer_pattern)

    def find_layers(self, model: nn.Module, pattern: str, mask: str = "attention_mask") -> list[AttentionLayer]:
        """The attention modules whose full names match ``pattern`` (group 1: their number), in that
        order and numbered 0, 1, ..., with this adapter's projection names relative to them, each
        checked by ``verify_layer``; ``mask``: the batch entry masking their tokens."""
        num_heads, num_kv_heads = self.num_heads(model), self.num_kv_heads(model)
        found = {int(match.group(1)): name for name, match in _modules_named(model, pattern)}
        modules = dict(model.named_modules())
        relative = {part: getattr(self, part) for part in ("q", "k", "v", "qkv", "o")}
        layers = []
        for offset, index in enumerate(sorted(found)):
            prefix = found[index] + "."
            projections = {part: prefix + rel for part, rel in relative.items() if rel}
            extra_rows = tuple(prefix + rel for rel in self.extra_rows if prefix + rel in modules)  # those present
            first = modules.get(projections.get("qkv", projections.get("q")))
            if first is None:
                raise UnsupportedModelError(f"{self.describe_name()}: {found[index]!r} has no {relative['qkv'] or relative['q']!r}")
            out_features = features(first)[1]
            fused = "qkv" in projections
            head_dim = out_features // (num_heads + (2 * num_kv_heads if fused else 0))
            layer = AttentionLayer(offset, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                                   qkv_layout=self.layout(model) if fused else STACKED, extra_rows=extra_rows, mask=mask,
                                   **projections)
            verify_layer(layer, modules, self.describe_name())
            layers.append(layer)
        return layers

    def describe_name(self) -> str:
        return f"hifi_fast's {self.family} adapter"

    def default_modules_to_save(self, model: nn.Module) -> list[str]:
        """The task head modules present on ``model`` (trained in full by default)."""
        children = dict(model.named_children())
        return [name for name in self.task_heads if name in children]
