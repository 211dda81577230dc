"""The scoring pass (DESIGN §1.1-1.4): one frozen forward over the scoring set, per-head statistics
accumulated while streaming from a hook on each output projection's input; optionally, in the same
pass, the heads' task importance (gate gradients, ``hifi_fast.selecting.importance``)."""
from __future__ import annotations

from collections.abc import Iterable
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from ..adapters import DECODER_MASK, attention_layers, get_adapter
from ..backends import ops_for
from ..config import WARMUP_LR, WARMUP_STEPS, HiFiConfig, check_warmup
from ..heads import HeadScores, HeadSelection
from ..ops import cka_from_cross, entropy_from_grams
from ..tuning.modules import HeadSliceMixin, head_param_cost
from .batches import scoring_stream
from .importance import (
    TaskGradients, gated, logits_of, only_trainable, per_example_loss, refuse_encoder_decoders,
    task_head_names, task_head_restorer, warm_up_task_head,
)
from .pagerank import pagerank
from .selection import select_heads, select_random_heads


class _Accumulator:
    """Running sums of per-example entropy, CKA and (optionally) ``|dL/d xi|`` and the heads' slice
    gradient L1 norms for every layer, on the model's device."""

    def __init__(self, num_layers: int, num_heads: int, device: torch.device, importance: bool = False,
                 gradient: bool = False, mask_keys: list[str] | None = None, pads_inputs: bool = False) -> None:
        self.entropy = torch.zeros(num_layers, num_heads, dtype=torch.float64, device=device)
        self.cka = torch.zeros(num_layers, num_heads, num_heads, dtype=torch.float64, device=device)
        self.importance = torch.zeros_like(self.entropy) if importance else None
        self.gradient = torch.zeros_like(self.entropy) if gradient else None
        self.finite = torch.ones(num_layers, dtype=torch.bool, device=device)
        # the batch entry holding each layer's token mask (an encoder-decoder's decoder layers: the decoder's)
        self.mask_keys = mask_keys or ["attention_mask"] * num_layers
        self.masks: dict[str, torch.Tensor] = {}
        self.pads_inputs = pads_inputs  # tokens the model appends itself (BigBird's block-sparse mode) are padding

    def add(self, layer: int, context: torch.Tensor, num_heads: int) -> None:
        batch, tokens, width = context.shape
        mask = self.masks.get(self.mask_keys[layer])
        if mask is None:  # images have no mask: every token (class, distillation, patches) is valid
            mask = torch.ones(batch, tokens, dtype=torch.long, device=context.device)
        elif self.pads_inputs and mask.shape[1] < tokens:
            mask = torch.nn.functional.pad(mask, (0, tokens - mask.shape[1]))
        context = context.view(batch, tokens, num_heads, width // num_heads)
        self.finite[layer] &= torch.isfinite(context).all()
        gram, cross = ops_for(context).head_grams(context, mask)
        # NaNs would make the eigen-solver raise an opaque error; they are reported by layer at the end.
        gram, cross = torch.nan_to_num(gram, 0.0, 0.0, 0.0), torch.nan_to_num(cross, 0.0, 0.0, 0.0)
        self.entropy[layer] += entropy_from_grams(gram).sum(dim=0)
        self.cka[layer] += cka_from_cross(cross).to(torch.float64).sum(dim=0)

    def add_task(self, gate_grads: torch.Tensor | None, slice_grads: torch.Tensor | None) -> None:
        """``gate_grads``: ``[L, B, H]`` per-example ``dL/d xi`` of one batch; ``slice_grads``: ``[L, H]``
        L1 norms of each head's slice gradient of the batch's summed loss."""
        if gate_grads is not None:
            gate_grads = gate_grads.to(self.entropy.device)
            self.finite &= torch.isfinite(gate_grads).flatten(1).all(dim=1)
            self.importance += gate_grads.abs().sum(dim=1)
        if slice_grads is not None:
            slice_grads = slice_grads.to(self.entropy.device)
            self.finite &= torch.isfinite(slice_grads).all(dim=1)
            self.gradient += slice_grads

    def all_reduce(self, seen: int) -> int:
        """Under ``torch.distributed``, sum every rank's statistics so all ranks select the same heads
        as one process scoring the union of the shards would; returns the total example count."""
        if not (dist.is_available() and dist.is_initialized()):
            return seen
        count = torch.tensor([float(seen)], dtype=torch.float64, device=self.entropy.device)
        bad = (~self.finite).to(torch.float64)
        for tensor in (self.entropy, self.cka, self.importance, self.gradient, count, bad):
            if tensor is not None:
                dist.all_reduce(tensor)
        self.finite = bad == 0
        return int(count.item())


def score_heads(
    model: nn.Module,
    batches: Iterable[dict],
    num_examples: int = 256,
    damping: float = 0.85,
    progress: bool = False,
    importance: bool = False,
    gradient: bool = False,
    warmup_steps: int = WARMUP_STEPS,
    warmup_lr: float = WARMUP_LR,
    keep_warmed_head: bool = True,
) -> HeadScores:
    """Score every attention head of ``model`` on up to ``num_examples`` examples of ``batches``.

    Args:
        model: a supported ``transformers`` model; run frozen in eval mode (its mode is restored).
        batches: iterable of dicts with ``input_ids`` ``[B, T]`` and ``attention_mask`` for text
            models, ``pixel_values`` ``[B, C, H, W]`` for vision models (every token counts; other
            keys are ignored, ``labels`` too unless ``importance``). Padding tokens take no part in
            any statistic.
        num_examples: examples to read; the last batch is cut to fit.
        damping: PageRank damping.
        progress: show a tqdm bar.
        importance: also measure each head's task importance (``hifi_fast.selecting.importance``): the mean
            over the examples of ``|dL/d xi_h|`` for a gate ``xi_h = 1`` on the head's output, taken
            in the same pass as the statistics (one forward with grad for the gates only, one
            backward). Classifiers need ``labels`` in every batch; causal LMs predict their text
            (or take ``labels``). A model with a separate task head first gets ``warmup_steps``
            AdamW steps (``warmup_lr``) of training of that head alone on these examples (backbone
            frozen), and by default **keeps the warmed head** as the start of fine-tuning;
            ``warmup_steps=0`` leaves the model untouched. For the warm-up the scoring examples and
            the backbone's outputs of them are held on the model's device.
        gradient: also measure each head's slice gradient (``score="gradient"``): the L1 norm of
            the loss gradient over the Q/K/V rows and O columns the head would train, from the same
            backward (the projections' weights require grad during the pass; no ``.grad`` is left);
            same labels and warm-up as ``importance``. The model must not be patched.
        warmup_steps, warmup_lr: that warm-up (with ``importance`` or ``gradient`` only).
        keep_warmed_head: ``False`` puts the task head's values from before the warm-up back once
            the scores are taken (the model leaves as it came in).

    Returns:
        ``HeadScores`` with ``richness`` ``[L, H]``, ``correlation`` ``[L, H, H]``, ``pagerank`` ``[L, H]``
        and, with ``importance`` / ``gradient``, those ``[L, H]`` too.
    """
    if num_examples < 1:
        raise ValueError(f"num_examples must be >= 1, got {num_examples}")
    check_warmup(warmup_steps, warmup_lr, "score_heads: warmup")
    layers = attention_layers(model)
    adapter = get_adapter(model)
    input_key = adapter.input_key
    num_heads = layers[0].num_heads
    device = next(model.parameters()).device
    if gradient and any(isinstance(m, HeadSliceMixin) for m in model.modules()):
        raise ValueError("score_heads(gradient=True) takes the gradients of the base projections: unpatch the model "
                         "first (hifi_fast.unpatch)")
    task_aware = importance or gradient
    decoder = model if any(layer.mask == DECODER_MASK for layer in layers) else None  # encoder-decoders
    if task_aware:
        refuse_encoder_decoders(model, layers)
    acc = _Accumulator(len(layers), num_heads, device, importance, gradient, [layer.mask for layer in layers],
                       adapter.pads_inputs)
    causal_lm = task_aware and not task_head_names(model)
    task = TaskGradients(model, layers, importance, gradient) if task_aware else None

    def observe(layer: int, context: torch.Tensor) -> torch.Tensor | None:
        with torch.no_grad():
            acc.add(layer, context.detach(), num_heads)
        return None if task is None else task.apply(layer, context)

    was_training = model.training
    model.eval()
    seen = 0
    warm_up = task_aware and warmup_steps and not causal_lm
    # without keep_warmed_head the warm-up serves the scores only: the head's values go back after
    restore_head = task_head_restorer(model) if warm_up and not keep_warmed_head else lambda: None
    try:
        stream = scoring_stream(batches, device, num_examples, input_key, task_aware, causal_lm, decoder)
        if warm_up:
            stream = list(stream)  # read twice: warm-up, then the scoring pass
            warm_up_task_head(model, stream, warmup_steps, warmup_lr)
        frozen = only_trainable(model, task.trainable) if task is not None else nullcontext()
        with gated(model, layers, observe), frozen, \
                tqdm(total=num_examples, desc="scoring heads", unit="ex", disable=not progress) as bar:
            for inputs, labels in stream:
                acc.masks = inputs
                if task is None:
                    with torch.no_grad():
                        getattr(model, "base_model", model)(**inputs)
                else:
                    with torch.enable_grad():
                        loss = per_example_loss(model, logits_of(model, inputs), labels, causal_lm).sum()
                        acc.add_task(*task.backward(loss))
                taken = inputs[input_key].shape[0]
                seen += taken
                bar.update(taken)
    finally:
        model.train(was_training)
        restore_head()
    seen = acc.all_reduce(seen)
    if seen == 0:
        raise ValueError("the scoring set is empty: batches yielded no example")
    bad = (~acc.finite).nonzero().flatten().tolist()
    if bad:
        what = "attention outputs or task gradients" if task_aware else "attention outputs"
        raise ValueError(f"non-finite (NaN/inf) {what} in layers {bad} while scoring")
    runs = torch.tensor([layer.applications for layer in layers], dtype=torch.float64, device=acc.entropy.device)
    richness = acc.entropy / seen / runs[:, None]  # a shared layer's module runs `applications` times per example
    correlation = acc.cka / seen / runs[:, None, None]
    correlation.diagonal(dim1=-2, dim2=-1).fill_(1.0)
    return HeadScores(
        richness=richness.cpu(),
        correlation=correlation.cpu(),
        pagerank=pagerank(correlation, richness, damping).cpu(),
        num_examples=seen,
        damping=damping,
        params_per_head=head_param_cost(model),
        importance=None if acc.importance is None else (acc.importance / seen).cpu(),
        gradient=None if acc.gradient is None else (acc.gradient / seen).cpu(),
    )


def score_for_config(model: nn.Module, batches: Iterable[dict], config: HiFiConfig, progress: bool = False) -> HeadScores:
    """``score_heads`` as ``config`` asks: its number of scoring examples and damping, and head
    importance (with its warm-up) when ``config.score == "importance"``."""
    return score_heads(
        model, batches, num_examples=config.num_scoring_examples, damping=config.damping, progress=progress,
        importance=config.score == "importance", gradient=config.score == "gradient",
        warmup_steps=config.importance_warmup_steps, warmup_lr=config.importance_warmup_lr,
        keep_warmed_head=config.keep_warmed_head,
    )


def select_for_config(model: nn.Module, batches: Iterable[dict] | None, config: HiFiConfig,
                      progress: bool = False) -> HeadSelection:
    """The heads ``config`` selects in ``model``: scored on ``batches`` (``score_for_config``), except
    for ``score="random"``, which depends on the model's geometry and the seed only and runs no
    scoring pass (``batches`` unused, may be ``None``; the selection then holds no scores)."""
    if config.score == "random":
        layers = attention_layers(model)
        return select_random_heads(len(layers), layers[0].num_heads, head_param_cost(model), config)
    if batches is None:
        raise ValueError(f"score={config.score!r} needs scoring batches (batches=...) to score the heads on; "
                         "only score='random' selects without them")
    return select_heads(score_for_config(model, batches, config, progress=progress), config)
