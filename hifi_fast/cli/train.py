"""A plain training loop and evaluation for sequence classifiers (used by ``hifi-fast``).

The loop works for any model whose trainable parameters have ``requires_grad=True``: a HiFi-patched
model, a peft model, a fully trainable or a frozen-backbone one. AdamW over the trainable parameters,
linear schedule with warmup, gradient clipping, dynamic padding. Metrics (accuracy, macro-F1,
confusion matrix) are computed by hand with numpy.
"""
from __future__ import annotations

import math
import os
import random
import resource
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..storing.training_state import LoopPosition, load_state, save_state
from ..tuning.guard import NonFiniteGuard
from .data import IGNORE_INDEX, Encoded, iter_batches, num_batches


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def linear_schedule_with_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    """LR factor rising linearly 0 -> 1 over ``warmup_steps``, then falling linearly to 0 at
    ``total_steps``."""
    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# -------------------------------------------------------------------------------------------- memory

def _current_rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def process_peak_rss_mb() -> float:
    """Peak resident memory of this process so far (``getrusage``), in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


class PeakMemory:
    """Peak memory while the block runs: on CUDA ``max_memory_allocated``; on CPU the resident set
    size sampled every ``interval`` s by a thread (``getrusage`` peak where ``/proc`` is missing)."""

    def __init__(self, device: torch.device | str = "cpu", interval: float = 0.05) -> None:
        self.device = torch.device(device)
        self.interval = interval
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while True:
            rss = _current_rss_bytes()
            if rss is not None:
                self.peak_mb = max(self.peak_mb, rss / 2**20)
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif _current_rss_bytes() is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
        else:
            self.peak_mb = process_peak_rss_mb()


# ------------------------------------------------------------------------------------------ training

@dataclass
class TrainResult:
    steps: int
    epochs: int
    train_time_s: float
    tokens: int
    tokens_per_s: float
    final_loss: float
    epoch_losses: list[float] = field(default_factory=list)
    peak_memory_mb: float = 0.0
    skipped_steps: int = 0  # optimizer steps skipped for a non-finite loss or gradient

    def to_dict(self) -> dict:
        return asdict(self)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameter (requires_grad=True)")
    return params


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def train_model(
    model: nn.Module,
    data: Encoded,
    *,
    epochs: int = 1,
    lr: float = 5e-4,
    batch_size: int = 32,
    warmup_ratio: float = 0.06,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
    seed: int = 0,
    max_consecutive_skips: int = 5,
    state_dir: Path | None = None,
    save_every: int = 0,
    resume: bool = False,
    progress: bool = True,
    desc: str = "training",
) -> TrainResult:
    """Train ``model`` in place on ``data`` (labels required) and return timing and loss figures.

    A step whose loss or gradient is not finite is skipped (weights untouched, counted in
    ``skipped_steps``, logged); ``max_consecutive_skips`` in a row stop the run with
    ``NonFiniteStepError`` naming the epoch, batch and step. Every ``save_every`` steps the whole
    loop state goes to ``state_dir`` (``training_state.save_state``); ``resume`` continues from it
    exactly where it was saved (same model set-up, data and settings)."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if data.labels is None and data.token_labels is None:
        raise ValueError("training data has no labels")
    if (save_every or resume) and state_dir is None:
        raise ValueError("save_every and resume need a state_dir")
    device = next(model.parameters()).device
    params = trainable_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    guard = NonFiniteGuard(params, max_consecutive=max_consecutive_skips)
    per_epoch = num_batches(data, batch_size)
    total = per_epoch * epochs
    scheduler = linear_schedule_with_warmup(optimizer, int(math.ceil(warmup_ratio * total)), total)
    at = load_state(state_dir, model, optimizer, scheduler) if resume else LoopPosition()
    guard.skipped, guard.consecutive = at.skipped, at.consecutive_skips
    model.train()
    memory = PeakMemory(device)
    start = time.perf_counter() - at.train_time_s
    with memory, tqdm(total=total, initial=at.steps, desc=desc, unit="step", disable=not progress,
                      dynamic_ncols=True) as bar:
        for epoch in range(at.epoch, epochs):
            for index, batch in enumerate(iter_batches(data, batch_size, shuffle=True, seed=seed * 1000 + epoch)):
                if epoch == at.epoch and index < at.batch:
                    continue  # trained before the run was interrupted
                batch = _to_device(batch, device)
                loss = model(**batch).loss
                loss.backward()
                norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm) if max_grad_norm is not None else None
                where = f"epoch {epoch + 1}, batch {index + 1} (step {at.steps + 1})"
                if guard.step(optimizer, loss, grad_norm=norm, where=where):
                    scheduler.step()
                    value = loss.item()
                    at.loss_sum += value * len(batch["labels"])
                    at.loss_n += len(batch["labels"])
                    at.smoothed = value if at.smoothed is None else 0.9 * at.smoothed + 0.1 * value
                optimizer.zero_grad(set_to_none=True)
                at.epoch, at.batch, at.steps = epoch, index + 1, at.steps + 1
                at.tokens += int(batch["attention_mask"].sum())
                elapsed = time.perf_counter() - start
                if save_every and at.steps % save_every == 0:
                    at.skipped, at.consecutive_skips, at.train_time_s = guard.skipped, guard.consecutive, elapsed
                    save_state(state_dir, model, optimizer, scheduler, at)
                bar.update(1)
                smoothed = f"{at.smoothed:.4f}" if at.smoothed is not None else "-"
                bar.set_postfix(epoch=epoch + 1, loss=smoothed, tok_s=f"{at.tokens / max(elapsed, 1e-9):,.0f}",
                                lr=f"{scheduler.get_last_lr()[0]:.2e}", skipped=guard.skipped, refresh=False)
            at.epoch_losses.append(at.loss_sum / max(at.loss_n, 1))
            at.epoch, at.batch, at.loss_sum, at.loss_n = epoch + 1, 0, 0.0, 0
    elapsed = time.perf_counter() - start
    model.eval()
    return TrainResult(
        steps=at.steps, epochs=epochs, train_time_s=elapsed, tokens=at.tokens,
        tokens_per_s=at.tokens / max(elapsed, 1e-9), final_loss=at.epoch_losses[-1], epoch_losses=at.epoch_losses,
        peak_memory_mb=memory.peak_mb, skipped_steps=guard.skipped,
    )


# ---------------------------------------------------------------------------------------- evaluation

def classification_metrics(predictions, labels, num_classes: int, label_names: list[str] | None = None) -> dict:
    """Accuracy, macro-F1 (mean over classes of F1; a class with no prediction and no example
    counts 0), per-class precision/recall/F1 and the confusion matrix (rows: true, columns: predicted)."""
    predictions = np.asarray(predictions, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    if predictions.shape != labels.shape:
        raise ValueError(f"predictions {predictions.shape} and labels {labels.shape} differ in shape")
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels, predictions), 1)
    true_pos = np.diag(confusion).astype(np.float64)
    predicted = confusion.sum(axis=0).astype(np.float64)
    actual = confusion.sum(axis=1).astype(np.float64)
    precision = np.divide(true_pos, predicted, out=np.zeros(num_classes), where=predicted > 0)
    recall = np.divide(true_pos, actual, out=np.zeros(num_classes), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(num_classes), where=denom > 0)
    names = label_names or [str(i) for i in range(num_classes)]
    return {
        "accuracy": float(true_pos.sum() / max(len(labels), 1)),
        "macro_f1": float(f1.mean()) if num_classes else 0.0,
        "per_class": {
            names[i]: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                       "support": int(actual[i])}
            for i in range(num_classes)
        },
        "confusion_matrix": confusion.tolist(),
        "num_examples": int(len(labels)),
    }


@torch.no_grad()
def predict_logits(model: nn.Module, data: Encoded, batch_size: int = 64, progress: bool = False,
                   desc: str = "predicting") -> torch.Tensor:
    """Logits ``[N, num_labels]`` of ``data`` in its order (model in eval mode)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        with tqdm(total=len(data), desc=desc, unit="ex", disable=not progress, dynamic_ncols=True) as bar:
            for batch in iter_batches(data, batch_size):
                batch.pop("labels", None)
                out.append(model(**_to_device(batch, device)).logits.float().cpu())
                bar.update(batch["input_ids"].shape[0])
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 0)


def evaluate(model: nn.Module, data: Encoded, num_classes: int, label_names: list[str] | None = None,
             batch_size: int = 64, progress: bool = False) -> dict:
    """``classification_metrics`` of the model on ``data`` plus its mean cross-entropy ``loss``."""
    if data.labels is None:
        raise ValueError("evaluation data has no labels")
    start = time.perf_counter()
    logits = predict_logits(model, data, batch_size, progress, desc="evaluating")
    labels = torch.tensor(data.labels)
    metrics = classification_metrics(logits.argmax(-1).numpy(), labels.numpy(), num_classes, label_names)
    metrics["loss"] = float(torch.nn.functional.cross_entropy(logits, labels))
    metrics["eval_time_s"] = time.perf_counter() - start
    return metrics


@torch.no_grad()
def evaluate_causal_lm(model: nn.Module, data: Encoded, batch_size: int = 16, progress: bool = False) -> dict:
    """Mean next-token cross-entropy over every target token of ``data`` (``token_labels``; the prompt
    and the padding excluded) and its perplexity."""
    if data.token_labels is None:
        raise ValueError("evaluation data has no token targets (encode it with lm_data.encode_lm)")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    start = time.perf_counter()
    try:
        for batch in tqdm(list(iter_batches(data, batch_size)), desc="evaluating", disable=not progress):
            batch = _to_device(batch, device)
            labels = batch.pop("labels")
            logits = model(**batch).logits[:, :-1].float()
            targets = labels[:, 1:]
            total += float(torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="sum"))
            count += int((targets != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": count,
            "eval_time_s": time.perf_counter() - start}
