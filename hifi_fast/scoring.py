"""The scoring pass (DESIGN §1.1-1.4): one frozen forward over the scoring set, per-head statistics
accumulated while streaming from a hook on each output projection's input; optionally, in the same
pass, the heads' task importance (gate gradients, ``hifi_fast.importance``)."""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from .adapters import DECODER_MASK, attention_layers, get_adapter
from .backends import ops_for
from .config import WARMUP_LR, WARMUP_STEPS, HiFiConfig, check_warmup
from .importance import (
    TaskGradients, batch_labels, gated, logits_of, only_trainable, per_example_loss, refuse_encoder_decoders,
    task_head_names, task_head_restorer, warm_up_task_head,
)
from .ops import cka_from_cross, entropy_from_grams
from .modules import HeadSliceMixin, head_param_cost
from .pagerank import pagerank
from .scores import HeadScores
from .selection import HeadSelection, select_heads, select_random_heads

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
PIXEL_VALUES = "pixel_values"


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


def _model_inputs(batch: dict, device: torch.device, index: int, limit: int, input_key: str = "input_ids",
                  decoder: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The model's inputs of one batch, cut to ``limit`` examples and checked while still on the
    host (so the scoring loop needs no device sync), then moved to ``device``. ``input_key`` is what
    the model takes: ``input_ids`` (text) or ``pixel_values`` (images). ``decoder``: an
    encoder-decoder model, whose decoder inputs are added (``_decoder_inputs``)."""
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
    if decoder is not None:
        inputs.update(_decoder_inputs(decoder, batch, inputs, index, limit))
    return {k: v.to(device, non_blocking=True) for k, v in inputs.items()}


def _decoder_inputs(model: nn.Module, batch: dict, inputs: dict, index: int, limit: int) -> dict[str, torch.Tensor]:
    """An encoder-decoder's decoder inputs: ``decoder_input_ids`` (with ``decoder_attention_mask``, default
    all ones), else token ``labels`` shifted right as the model's loss does (mask: the labels that are
    not -100), else, for a classifier (whose task head reads the decoder), the input shifted right,
    as such models do themselves (mask: ``attention_mask``)."""
    labels = torch.as_tensor(batch["labels"])[:limit] if "labels" in batch else None
    if "decoder_input_ids" in batch:
        ids = torch.as_tensor(batch["decoder_input_ids"])[:limit]
        mask = torch.as_tensor(batch["decoder_attention_mask"])[:limit] if "decoder_attention_mask" in batch else None
    elif labels is not None and labels.dim() == 2 and hasattr(model, "prepare_decoder_input_ids_from_labels"):
        ids = model.prepare_decoder_input_ids_from_labels(labels=labels)
        mask = (labels != -100).long()
    elif get_adapter(model).default_modules_to_save(model):
        ids, mask = _shift_right(model, inputs["input_ids"]), inputs["attention_mask"]
    else:
        raise TypeError(f"scoring batch {index}: an encoder-decoder's decoder layers need 'decoder_input_ids' or token "
                        f"'labels' ([batch, tokens], padding -100) to read (batch keys: {sorted(batch)})")
    mask = torch.ones_like(ids) if mask is None else mask
    _check_mask(mask, index, "decoder ")
    return {"decoder_input_ids": ids, DECODER_MASK: mask}


def _shift_right(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    config = model.config
    start = config.decoder_start_token_id if config.decoder_start_token_id is not None else config.pad_token_id
    shifted = ids.new_full(ids.shape, start)
    shifted[:, 1:] = ids[:, :-1]
    return shifted


def _pixel_values(pixels, index: int, limit: int) -> torch.Tensor:
    pixels = torch.as_tensor(pixels)[:limit]
    if pixels.dim() != 4 or pixels.shape[0] == 0 or not pixels.is_floating_point():
        raise ValueError(
            f"scoring batch {index}: pixel_values must be a float [batch, channels, height, width] tensor with "
            f"at least one image, got {tuple(pixels.shape)} {pixels.dtype}"
        )
    return pixels


def _check_mask(mask: torch.Tensor, index: int, what: str = "") -> None:
    valid = (mask != 0).sum(dim=1)
    if int(valid.sum()) == 0:
        raise ValueError(f"scoring batch {index} is all {what}padding ({what}attention_mask has no nonzero entry)")
    empty = (valid == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"scoring batch {index}: examples {empty} are all {what}padding; drop them from the scoring set")


def scoring_stream(batches: Iterable[dict], device: torch.device, num_examples: int, input_key: str,
                    labels: bool, causal_lm: bool, decoder: nn.Module | None = None,
                    ) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor | None]]:
    """``(inputs, labels or None)`` of the batches until ``num_examples`` examples are taken (the last
    batch cut to fit; no batch is read past it); ``decoder``: an encoder-decoder model (decoder inputs
    added)."""
    seen = 0
    for index, batch in enumerate(batches):
        inputs = _model_inputs(batch, device, index, num_examples - seen, input_key, decoder)
        yield inputs, batch_labels(batch, inputs, index, num_examples - seen, causal_lm) if labels else None
        seen += inputs[input_key].shape[0]
        if seen >= num_examples:
            return


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
        importance: also measure each head's task importance (``hifi_fast.importance``): the mean
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
