"""What an interrupted training loop needs to continue exactly where it stopped.

One file, ``training_state.pt``, written atomically (``files.atomic_write``): the trained tensors
(HiFi's slices and task head, or whatever has ``requires_grad``), the optimizer's and scheduler's
states, the loop's position and running sums, and the random generators' states (dropout, shuffling).
Restored, a run continues bit for bit as if it had not stopped (on CPU; on GPU as far as its kernels
are deterministic).
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .files import atomic_write

STATE_NAME = "training_state.pt"
FORMAT_VERSION = 1


@dataclass
class LoopPosition:
    """Where the loop is: the next batch to run is ``batch`` of ``epoch`` (both 0-based)."""

    epoch: int = 0
    batch: int = 0
    steps: int = 0
    tokens: int = 0
    loss_sum: float = 0.0
    loss_n: int = 0
    smoothed: float | None = None
    epoch_losses: list[float] = field(default_factory=list)
    skipped: int = 0
    consecutive_skips: int = 0
    train_time_s: float = 0.0


def _rng_state() -> dict:
    numpy_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]],
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))


def save_state(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
               position: LoopPosition) -> Path:
    """Write ``directory/training_state.pt`` in one atomic step; returns its path."""
    state = {
        "format_version": FORMAT_VERSION,
        "trainable": {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "position": asdict(position),
        "rng": _rng_state(),
    }
    path = Path(directory) / STATE_NAME
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    return path


def load_state(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler) -> LoopPosition:
    """Restore the trained tensors, optimizer, scheduler and random generators from
    ``directory/training_state.pt`` (written by ``save_state`` for the same set-up); returns the
    loop's position. Refuses, changing nothing, a state whose tensors do not fit ``model``."""
    path = Path(directory) / STATE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no training state to resume from: {path} is missing")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a training state of format {FORMAT_VERSION}")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    saved = state["trainable"]
    if set(saved) != set(params) or any(saved[n].shape != p.shape or saved[n].dtype != p.dtype for n, p in params.items()):
        raise ValueError(f"{path} was saved for other trained parameters than this run's (names, shapes or dtypes; "
                         "its set-up changed)")
    # Before the parameters: Optimizer.load_state_dict refuses a state of other parameter groups
    # before it changes anything (no copy of the optimizer's state is needed to undo it).
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(saved[name])
    _set_rng_state(state["rng"])
    return LoopPosition(**state["position"])
