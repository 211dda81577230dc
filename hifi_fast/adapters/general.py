"""The general adapter: tried for a model whose ``config.model_type`` no family adapter lists.

It accepts a model exactly when its attention follows the common pattern, and refuses it otherwise
(``UnsupportedModelError`` naming the module and what was expected), never patching approximately:

- one stack of attention modules, ``<prefix>.<N>.<attention>`` for N = 0, 1, ..., each with four
  projections found by name: ``q_proj``/``k_proj``/``v_proj`` with ``o_proj``, ``out_proj`` or
  ``dense``, or BERT's ``self.query``/``self.key``/``self.value`` with ``output.dense`` (the
  ``output`` block's norm after O allowed);
- every projection a plain ``nn.Linear`` of exactly the head geometry's shape: Q and O
  ``num_attention_heads * head_dim``, K and V ``num_key_value_heads * head_dim`` (``head_dim`` from
  the config, else ``hidden_size / num_attention_heads``);
- no other parameters inside the attention module but per-head norms (weights of ``head_dim``
  entries, as Qwen3's ``q_norm``): anything else (a norm over all heads, a head-mixing or global
  projection, learned sinks) may mix heads in ways a name cannot tell.

What it cannot see is the attention's forward: it assumes, as Hugging Face's attention does, that
head ``h`` reads rows ``h * head_dim ...`` of Q (and of K/V for its group) and writes input columns
``h * head_dim ...`` of O. ``hifi_fast.describe(model)`` says what it found.
"""
from __future__ import annotations

import re

from torch import nn

from .base import ArchitectureAdapter, AttentionLayer, UnsupportedModelError, verify_layer

# (q, k, v, o) names relative to an attention module, tried in order.
CANDIDATES = (
    ("q_proj", "k_proj", "v_proj", "o_proj"),
    ("q_proj", "k_proj", "v_proj", "out_proj"),
    ("q_proj", "k_proj", "v_proj", "dense"),
    ("self.query", "self.key", "self.value", "output.dense"),
)
_INDEX = re.compile(r"\.(\d+)\.")
# Names of fused Q/K/V projections: their head order (stacked or interleaved) is not in the name.
FUSED = ("query_key_value", "qkv_proj", "Wqkv", "c_attn", "qkv", "W_pack", "in_proj")


class GeneralAdapter(ArchitectureAdapter):
    family = "general"
    task_heads = ("score", "classifier")

    def describe_name(self) -> str:
        return "hifi_fast's general adapter"

    def num_heads(self, model: nn.Module) -> int:
        heads = _global(getattr(model, "config", None), "num_attention_heads")
        if not isinstance(heads, int) or heads < 1:
            raise UnsupportedModelError("its config has no num_attention_heads to take the head count from")
        return heads

    def num_kv_heads(self, model: nn.Module) -> int:
        return _global(model.config, "num_key_value_heads") or self.num_heads(model)

    def head_dim(self, model: nn.Module) -> int:
        config = model.config
        head_dim = _global(config, "head_dim")
        if head_dim:
            return head_dim
        hidden = getattr(config, "hidden_size", None)
        if not isinstance(hidden, int) or hidden % self.num_heads(model):
            raise UnsupportedModelError(f"its config has no head_dim, and hidden_size={hidden!r} is not a multiple "
                                        f"of num_attention_heads={self.num_heads(model)}")
        return hidden // self.num_heads(model)

    def check(self, model: nn.Module) -> None:
        self.layers(model)

    def layers(self, model: nn.Module) -> list[AttentionLayer]:
        num_heads, num_kv_heads, head_dim = self.num_heads(model), self.num_kv_heads(model), self.head_dim(model)
        modules = dict(model.named_modules())
        found = _attention_modules(modules)
        if not found:
            fused = next((n for n in modules if n.rsplit(".", 1)[-1] in FUSED), None)
            if fused is not None:
                raise UnsupportedModelError(
                    f"found a fused Q/K/V projection {fused!r} and no separate q/k/v projections; the general adapter "
                    "cannot tell from names how a fused projection orders its heads (stacked [Q | K | V] or "
                    "interleaved per head or group), so it needs a family adapter")
            tried = "; ".join("/".join(c) for c in CANDIDATES)
            raise UnsupportedModelError(f"found no attention module with projections named {tried}")
        stacks = sorted({_INDEX.sub(".*.", "." + name + ".")[1:-1] for name, _ in found})
        if len(stacks) > 1:
            raise UnsupportedModelError(
                f"found attention modules in {len(stacks)} stacks ({', '.join(stacks)}); the general adapter takes one "
                "stack of layers with one head geometry (patch one tower, or add a family adapter)")
        names = {name for name, _ in found}
        partial = [name for name in modules if name and name not in names and any(
            f"{name}.{q}" in modules and f"{name}.{o}" in modules for q, _, _, o in CANDIDATES)]
        if partial:
            raise UnsupportedModelError(
                f"attention modules {_listed(partial)} have query and output projections but not key and value "
                "projections of their own (e.g. layers that reuse another layer's keys and values); the general "
                "adapter would leave them out, so it needs a family adapter")
        indices = [_layer_index(name) for name, _ in found]
        if indices != list(range(len(found))):
            raise UnsupportedModelError(f"attention modules {[n for n, _ in found]} are not numbered 0, 1, ... in order")
        layers = []
        for index, (name, (q, k, v, o)) in enumerate(found):
            projections = {part: f"{name}.{rel}" for part, rel in zip("qkvo", (q, k, v, o))}
            layer = AttentionLayer(index, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, **projections)
            verify_layer(layer, modules, "")  # get_adapter's message names the adapter
            _refuse_other_parameters(modules[name], name, (q, k, v, o), head_dim)
            layers.append(layer)
        return layers


def _global(config, name: str):
    """``config.<name>``, or ``None``; a value that varies by layer (a per-layer config refuses to
    give it globally) is refused: one head geometry is what the general adapter takes."""
    try:
        return getattr(config, name, None)
    except Exception as err:
        raise UnsupportedModelError(f"its config gives no single {name} ({err})") from None


def _listed(names: list[str], most: int = 3) -> str:
    shown = ", ".join(repr(n) for n in names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def _attention_modules(modules: dict[str, nn.Module]) -> list[tuple[str, tuple[str, str, str, str]]]:
    found = []
    for name in modules:
        if not name:
            continue
        for names in CANDIDATES:
            if all(f"{name}.{rel}" in modules for rel in names):
                found.append((name, names))
                break
    return found


def _layer_index(name: str) -> int | None:
    indices = _INDEX.findall("." + name + ".")
    return int(indices[-1]) if indices else None


def _refuse_other_parameters(attention: nn.Module, name: str, projections: tuple[str, ...], head_dim: int) -> None:
    o = projections[-1]
    after_o = o.rsplit(".", 1)[0] + "." if "." in o else "\0"  # e.g. "output.": BertSelfOutput's LayerNorm
    owners = {sub: module for sub, module in attention.named_modules()}
    for param_name, param in attention.named_parameters():
        owner = param_name.rsplit(".", 1)[0] if "." in param_name else ""
        if any(owner == p or owner.startswith(p + ".") for p in projections):
            continue
        if owner.startswith(after_o):  # BERT's layout: the output block's norm runs after O
            continue
        module = owners.get(owner)
        per_head_norm = module is not None and "norm" in type(module).__name__.lower() and param.shape == (head_dim,)
        if not per_head_norm:
            where = f"{name}.{param_name}"
            raise UnsupportedModelError(
                f"{where!r} (shape {tuple(param.shape)}) belongs to the attention module {name!r} but is none of its "
                f"Q/K/V/O projections nor a per-head norm (a weight of head_dim={head_dim} entries): the general "
                "adapter cannot tell whether it mixes heads")
