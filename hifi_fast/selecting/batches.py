"""What the scoring pass reads from the batches: the model's inputs (decoder inputs for an
encoder-decoder, images for vision models), checked and cut to the examples asked for, and, for the
task-aware scores, the labels."""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import nn

from ..adapters import DECODER_MASK, get_adapter

IGNORE_INDEX = -100  # the label no loss is taken on
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
PIXEL_VALUES = "pixel_values"


def batch_labels(batch: Mapping, inputs: dict[str, torch.Tensor], index: int, limit: int,
                 causal_lm: bool) -> torch.Tensor:
    """The labels of one scoring batch, cut to ``limit`` examples, on the inputs' device.

    Classifiers need ``labels``. A causal LM takes ``labels`` when given (a collator's, prompt masked
    with -100) and else predicts its own text: ``input_ids`` with padding set to -100."""
    device = next(iter(inputs.values())).device
    if "labels" in batch:
        return torch.as_tensor(batch["labels"])[:limit].to(device, non_blocking=True)
    if not causal_lm:
        raise ValueError(
            f"score='importance' needs labels: scoring batch {index} has no 'labels' entry (keys: {sorted(batch)}); "
            "the importance of a head is the loss's sensitivity to it, and a classifier's loss needs the labels"
        )
    return inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, IGNORE_INDEX)


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
    if inputs["input_ids"].dim() != 2 or inputs["input_ids"].is_floating_point():
        raise ValueError(f"scoring batch {index}: input_ids must be integer token ids [batch, tokens], got "
                         f"{tuple(inputs['input_ids'].shape)} {inputs['input_ids'].dtype}")
    inputs.setdefault("attention_mask", torch.ones_like(inputs["input_ids"]))
    for key, value in inputs.items():
        if value.shape != inputs["input_ids"].shape:
            raise ValueError(f"scoring batch {index}: {key} must have input_ids' shape "
                             f"{tuple(inputs['input_ids'].shape)}, got {tuple(value.shape)}")
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
