"""Personalised PageRank on the per-layer head graphs (DESIGN §1.4), batched over layers."""
from __future__ import annotations

import torch


def column_stochastic(correlation: torch.Tensor) -> torch.Tensor:
    """Edge weights ``R[i, j]`` without self loops, each column scaled to sum 1 (an empty column
    becomes uniform). ``correlation``: ``[L, H, H]``."""
    num_heads = correlation.shape[-1]
    eye = torch.eye(num_heads, dtype=torch.bool, device=correlation.device)
    weights = correlation.masked_fill(eye, 0.0)
    col_sum = weights.sum(dim=-2, keepdim=True)
    uniform = torch.full_like(weights, 1.0 / num_heads)
    return torch.where(col_sum > 0, weights / col_sum.clamp_min(torch.finfo(weights.dtype).tiny), uniform)


def normalise_teleport(weights: torch.Tensor) -> torch.Tensor:
    """Rows of ``weights`` ``[L, H]`` scaled to sum 1; a row that sums to 0 becomes uniform."""
    total = weights.sum(dim=-1, keepdim=True)
    uniform = torch.full_like(weights, 1.0 / weights.shape[-1])
    return torch.where(total > 0, weights / total.clamp_min(torch.finfo(weights.dtype).tiny), uniform)


def pagerank(
    correlation: torch.Tensor,
    teleport: torch.Tensor | None = None,
    damping: float = 0.85,
    tol: float = 1e-10,
    max_iter: int = 100,
) -> torch.Tensor:
    """PageRank scores ``[L, H]`` (float64) of the graphs whose edge weights are ``correlation``
    ``[L, H, H]``; ``teleport`` ``[L, H]`` is normalised here (``None``: uniform).

    Each layer iterates ``s = (1 - d) v + d P s`` from ``s = v`` until its own L1 step is below
    ``tol``, then stays put while the others go on, so a batch equals layer-by-layer runs.
    """
    corr = correlation.to(torch.float64)
    num_layers, num_heads, _ = corr.shape
    if teleport is None:
        teleport = torch.ones(num_layers, num_heads, dtype=torch.float64, device=corr.device)
    v = normalise_teleport(teleport.to(torch.float64))
    transition = column_stochastic(corr)
    scores = v.clone()
    active = torch.ones(num_layers, 1, dtype=torch.bool, device=corr.device)
    for _ in range(max_iter):
        new = (1.0 - damping) * v + damping * torch.bmm(transition, scores.unsqueeze(-1)).squeeze(-1)
        new = torch.where(active, new, scores)
        step = (new - scores).abs().sum(dim=-1, keepdim=True)
        scores = new
        active = active & (step >= tol)
        if not bool(active.any()):
            break
    return scores
