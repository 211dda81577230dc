"""Per-head scoring statistics in plain batched PyTorch (DESIGN §1.2-1.3).

``head_grams`` is the GEMM-shaped pass that the Triton kernel fuses; the reductions below turn its
output into per-example entropies and CKA matrices. No loop over heads, pairs or examples.
"""
from __future__ import annotations

import torch


def head_grams(context: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gram statistics of one batch of one layer's head outputs.

    Args:
        context: ``[B, T, H, d]`` per-head context outputs (any float dtype).
        mask: ``[B, T]``, nonzero on valid tokens.

    Returns:
        ``gram``: ``[B, H, d, d]`` float64 uncentred per-head Grams ``CᵀC`` (float64 keeps the small
        singular values that an fp32 Gram buries in rounding).
        ``cross``: ``[B, H, H]`` float32 ``‖Ĉ_iᵀ Ĉ_j‖_F²`` of the token-centred outputs (the CKA
        numerators; their diagonal gives the denominators).
    """
    batch, tokens, heads, dim = context.shape
    valid = (mask != 0).to(torch.float32)[:, :, None, None]
    ctx = context.to(torch.float32) * valid
    ctx64 = ctx.to(torch.float64).permute(0, 2, 1, 3)  # [B, H, T, d]
    gram = torch.matmul(ctx64.transpose(-1, -2), ctx64)
    count = valid.sum(dim=1, keepdim=True).clamp_min(1.0)
    centred = ((ctx - ctx.sum(dim=1, keepdim=True) / count) * valid).reshape(batch, tokens, heads * dim)
    blocks = torch.bmm(centred.transpose(1, 2), centred).view(batch, heads, dim, heads, dim)
    cross = blocks.square().sum(dim=(2, 4))
    return gram, cross


def entropy_from_grams(gram: torch.Tensor) -> torch.Tensor:
    """Singular-value entropy ``[...]`` from Grams ``[..., d, d]``: ``σ = sqrt(eig(CᵀC))``,
    ``p = σ / Σσ``, ``H = -Σ p log p`` (0 for an all-zero output)."""
    eig = torch.linalg.eigvalsh(gram)
    # Eigenvalues below the solver's rounding (≈ d·eps·λ_max) are zeros of a rank-deficient Gram;
    # left in, their square roots (≈1e-8·σ_max) would add spurious entropy.
    cutoff = eig[..., -1:] * (gram.shape[-1] * torch.finfo(gram.dtype).eps)
    sigma = torch.where(eig > cutoff, eig, torch.zeros_like(eig)).sqrt()
    total = sigma.sum(dim=-1, keepdim=True)
    p = sigma / torch.where(total > 0, total, torch.ones_like(total))
    return -torch.special.xlogy(p, p).sum(dim=-1)


def cka_from_cross(cross: torch.Tensor) -> torch.Tensor:
    """Linear CKA ``[..., H, H]`` from the centred cross-head numerators ``[..., H, H]``
    (0 where a head's centred output is all zero)."""
    norm = cross.diagonal(dim1=-2, dim2=-1).clamp_min(0.0).sqrt()
    denom = norm[..., :, None] * norm[..., None, :]
    return torch.where(denom > 0, cross / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.zeros_like(cross))
