"""The scoring pass (DESIGN §1.1-1.4): one frozen forward over the scoring set, per-head statistics
accumulated while streaming from a hook on each output projection's input."""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from .adapters import attention_layers, get_adapter
from .backends import ops_for
from .ops import cka_from_cross, entropy_from_grams
from .modules import head_param_cost
from .pagerank import pagerank
from .scores import HeadScores

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
PIXEL_VALUES = "pixel_values"


class _Accumulator:
    """Running sums of per-example entropy and CKA for every layer, on the model's device."""

    def __init__(self, num_layers: int, num_heads: int, device: torch.device) -> None:
        self.entropy = torch.zeros(num_layers, num_heads, dtype=torch.float64, device=device)
        self.cka = torch.zeros(num_layers, num_heads, num_heads, dtype=torch.float64, device=device)
        self.finite = torch.ones(num_layers, dtype=torch.bool, device=device)
        self.mask: torch.Tensor | None = None

    def add(self, layer: int, context: torch.Tensor, num_heads: int) -> None:
        batch, tokens, width = context.shape
        # Images have no mask: every token (class, distillation, patches) is valid.
        mask = self.mask if self.mask is not None else torch.ones(batch, tokens, dtype=torch.long, device=context.device)
        context = context.view(batch, tokens, num_heads, width // num_heads)
        self.finite[layer] &= torch.isfinite(context).all()
        gram, cross = ops_for(context).head_grams(context, mask)
        # NaNs would make the eigen-solver raise an opaque error; they are reported by layer at the end.
        gram, cross = torch.nan_to_num(gram, 0.0, 0.0, 0.0), torch.nan_to_num(cross, 0.0, 0.0, 0.0)
        self.entropy[layer] += entropy_from_grams(gram).sum(dim=0)
        self.cka[layer] += cka_from_cross(cross).to(torch.float64).sum(dim=0)

    def all_reduce(self, seen: int) -> int:
        """Under ``torch.distributed``, sum every rank's statistics so all ranks select the same heads
        as one process scoring the union of the shards would; returns the total example count."""
        if not (dist.is_available() and dist.is_initialized()):
            return seen
        count = torch.tensor([float(seen)], dtype=torch.float64, device=self.entropy.device)
        bad = (~self.finite).to(torch.float64)
        for tensor in (self.entropy, self.cka, count, bad):
            dist.all_reduce(tensor)
        self.finite = bad == 0
        return int(count.item())


def _model_inputs(batch: dict, device: torch.device, index: int, limit: int, input_key: str = "input_ids") -> dict[str, torch.Tensor]:
    """The model's inputs of one batch, cut to ``limit`` examples and checked while still on the
    host (so the scoring loop needs no device sync), then moved to ``device``. ``input_key`` is what
    the model takes: ``input_ids`` (text) or ``pixel_values`` (images)."""
    if not isinstance(batch, Mapping) or ("input_ids" not in batch and PIXEL_VALUES not in batch):  # BatchEncoding too
        raise TypeError(f"scoring batch {index} must be a dict with 'input_ids' (and 'attention_mask') or 'pixel_values'")
    if input_key not in batch:
        raise TypeError(f"scoring batch {index} has no {input_key!r}, which this model takes (batch keys: {sorted(batch)})")
    if input_key == PIXEL_VALUES:
        return {PIXEL_VALUES: _pixel_values(batch[PIXEL_VALUES], index, limit).to(device, non_blocking=True)}
    inputs = {k: torch.as_tensor(batch[k])[:limit] for k in MODEL_INPUTS if k in batch}
    if inputs["input_ids"].dim() != 2:
        raise ValueError(f"scoring batch {index}: input_ids must be [batch, tokens], got {tuple(inputs['input_ids'].shape)}")
    inputs.setdefault("attention_mask", torch.ones_like(inputs["input_ids"]))
    _check_mask(inputs["attention_mask"], index)
    return {k: v.to(device, non_blocking=True) for k, v in inputs.items()}


def _pixel_values(pixels, index: int, limit: int) -> torch.Tensor:
    pixels = torch.as_tensor(pixels)[:limit]
    if pixels.dim() != 4 or pixels.shape[0] == 0 or not pixels.is_floating_point():
        raise ValueError(
            f"scoring batch {index}: pixel_values must be a float [batch, channels, height, width] tensor with "
            f"at least one image, got {tuple(pixels.shape)} {pixels.dtype}"
        )
    return pixels


def _check_mask(mask: torch.Tensor, index: int) -> None:
    valid = (mask != 0).sum(dim=1)
    if int(valid.sum()) == 0:
        raise ValueError(f"scoring batch {index} is all padding (attention_mask has no nonzero entry)")
    empty = (valid == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"scoring batch {index}: examples {empty} are all padding; drop them from the scoring set")


@torch.no_grad()
def score_heads(
    model: nn.Module,
    batches: Iterable[dict],
    num_examples: int = 256,
    damping: float = 0.85,
    progress: bool = False,
) -> HeadScores:
    """Score every attention head of ``model`` on up to ``num_examples`` examples of ``batches``.

    Args:
        model: a supported ``transformers`` model; run frozen in eval mode (its mode is restored).
        batches: iterable of dicts with ``input_ids`` ``[B, T]`` and ``attention_mask`` for text
            models, ``pixel_values`` ``[B, C, H, W]`` for vision models (every token counts; other
            keys, e.g. ``labels``, are ignored). Padding tokens take no part in any statistic.
        num_examples: examples to read; the last batch is cut to fit.
        damping: PageRank damping.
        progress: show a tqdm bar.

    Returns:
        ``HeadScores`` with ``richness`` ``[L, H]``, ``correlation`` ``[L, H, H]``, ``pagerank`` ``[L, H]``.
    """
    if num_examples < 1:
        raise ValueError(f"num_examples must be >= 1, got {num_examples}")
    layers = attention_layers(model)
    input_key = get_adapter(model).input_key
    num_heads = layers[0].num_heads
    device = next(model.parameters()).device
    acc = _Accumulator(len(layers), num_heads, device)
    modules = dict(model.named_modules())

    def hook_for(layer: int):
        def hook(_module, args):
            acc.add(layer, args[0], num_heads)
        return hook

    handles = [modules[layer.o].register_forward_pre_hook(hook_for(i)) for i, layer in enumerate(layers)]
    was_training = model.training
    model.eval()
    seen = 0
    forward = getattr(model, "base_model", model)
    try:
        with tqdm(total=num_examples, desc="scoring heads", unit="ex", disable=not progress) as bar:
            for index, batch in enumerate(batches):
                inputs = _model_inputs(batch, device, index, num_examples - seen, input_key)
                acc.mask = inputs.get("attention_mask")
                forward(**inputs)
                taken = inputs[input_key].shape[0]
                seen += taken
                bar.update(taken)
                if seen >= num_examples:
                    break
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    seen = acc.all_reduce(seen)
    if seen == 0:
        raise ValueError("the scoring set is empty: batches yielded no example")
    bad = (~acc.finite).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"non-finite (NaN/inf) attention outputs in layers {bad} while scoring")
    richness = acc.entropy / seen
    correlation = acc.cka / seen
    correlation.diagonal(dim1=-2, dim2=-1).fill_(1.0)
    return HeadScores(
        richness=richness.cpu(),
        correlation=correlation.cpu(),
        pagerank=pagerank(correlation, richness, damping).cpu(),
        num_examples=seen,
        damping=damping,
        params_per_head=head_param_cost(model),
    )
