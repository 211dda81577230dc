"""Non-finite steps never reach the weights (what AMP's ``GradScaler`` does for fp16 overflow).

A NaN/inf loss or gradient (a bad batch, an fp16 overflow) would go through ``optimizer.step()``
into the trained slices and, by the slice sync, into the base weights. ``NonFiniteGuard.step``
replaces ``optimizer.step()``: it steps only when the loss and the gradients are finite, otherwise
it drops the gradients, counts and logs the skip, and stops the run with ``NonFiniteStepError``
after ``max_consecutive`` skips in a row::

    guard = hifi_fast.NonFiniteGuard(model)
    for step, batch in enumerate(batches):
        loss = model(**batch).loss
        loss.backward()
        if guard.step(optimizer, loss, where=f"step {step}"):
            scheduler.step()
        optimizer.zero_grad()
"""
from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn

logger = logging.getLogger(__name__)


class NonFiniteStepError(FloatingPointError):
    """Too many consecutive steps had a non-finite loss or gradient."""


class NonFiniteGuard:
    """Skips optimizer steps whose loss or gradients are NaN/inf; see the module docstring.

    Args:
        parameters: the trained parameters (a module: its parameters with ``requires_grad``).
        max_consecutive: skips in a row after which ``step`` raises ``NonFiniteStepError``.
    """

    def __init__(self, parameters: nn.Module | Iterable[torch.Tensor], max_consecutive: int = 5) -> None:
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {max_consecutive}")
        if isinstance(parameters, nn.Module):
            parameters = (p for p in parameters.parameters() if p.requires_grad)
        self.parameters = list(parameters)
        self.max_consecutive = max_consecutive
        self.skipped = 0
        self.consecutive = 0

    def _grad_norm(self) -> torch.Tensor | None:
        grads = [p.grad for p in self.parameters if p.grad is not None]
        if not grads:
            return None
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))

    def step(self, optimizer: torch.optim.Optimizer, loss: torch.Tensor | None = None, *,
             grad_norm: torch.Tensor | None = None, where: str = "") -> bool:
        """``optimizer.step()`` if ``loss`` (when given) and the gradients are finite, and ``True``;
        else the gradients are dropped, nothing changes, and ``False``. ``grad_norm``: the total
        gradient norm if already known (e.g. from ``clip_grad_norm_``); ``where`` names the step
        and batch in the log and the error."""
        norm = self._grad_norm() if grad_norm is None else grad_norm
        bad = [name for name, value in (("loss", loss), ("gradient", norm))
               if value is not None and not bool(torch.isfinite(value.detach()).all())]
        if not bad:
            optimizer.step()
            self.consecutive = 0
            return True
        optimizer.zero_grad(set_to_none=True)
        self.skipped += 1
        self.consecutive += 1
        at = f" at {where}" if where else ""
        logger.warning("hifi_fast: skipped the optimizer step%s: non-finite %s (%d skipped so far)",
                       at, " and ".join(bad), self.skipped)
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteStepError(
                f"{self.consecutive} consecutive steps had a non-finite loss or gradient, the last{at}; stopping "
                "(lower the learning rate, check that batch's data, or train in bf16 rather than fp16)"
            )
        return False
