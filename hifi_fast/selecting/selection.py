"""The selection rules of DESIGN §1.5: ``HeadScores`` -> ``HeadSelection``."""
from __future__ import annotations

import torch

from ..config import TASK_SCORES, HiFiConfig
from ..heads import HeadScores, HeadSelection
from .pagerank import pagerank


def ranking_scores(scores: HeadScores, config: HiFiConfig) -> torch.Tensor:
    """The ``[L, H]`` score that ranks heads for ``config.score``."""
    if config.score == "pagerank":
        if config.damping == scores.damping:
            return scores.pagerank
        return pagerank(scores.correlation, scores.richness, config.damping)
    if config.score == "richness":
        return scores.richness.to(torch.float64)
    if config.score == "correlation":
        return pagerank(scores.correlation, None, config.damping)
    if config.score in TASK_SCORES:
        return normalised_task_score(scores, config.score)
    return random_ranking(*scores.richness.shape, config.seed)


def random_ranking(num_layers: int, num_heads: int, seed: int) -> torch.Tensor:
    """``score="random"``: a seeded ``[L, H]`` draw that depends on nothing but the shape and seed."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((num_layers, num_heads), generator=generator, dtype=torch.float64)


def normalised_task_score(scores: HeadScores, name: str) -> torch.Tensor:
    """``scores.importance`` or ``scores.gradient`` ``[L, H]`` divided by each layer's L2 norm across
    heads (Michel et al. 2019 normalise per layer so that layers compare in a global ranking; a layer
    of zeros stays 0)."""
    values = getattr(scores, name)
    if values is None:
        raise ValueError(
            f"score={name!r} needs head {name} in the scores, which these do not hold: compute them with "
            f"hifi_fast.score_heads(model, batches, {name}=True) (or hifi_fast.selecting.scoring.score_for_config"
            "(model, batches, config)) on scoring batches with labels"
        )
    values = values.to(torch.float64)
    norm = torch.linalg.vector_norm(values, dim=-1, keepdim=True)
    return torch.where(norm > 0, values / norm.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(values))


def resolve_heads_per_layer(num_layers: int, num_heads: int, params_per_head: int, config: HiFiConfig) -> int:
    """``k`` from the config, checked against the model, or derived from the parameter budget."""
    if config.heads_per_layer is not None:
        k = config.heads_per_layer
        if k > num_heads:
            raise ValueError(f"heads_per_layer={k} exceeds the model's {num_heads} heads per layer")
        return k
    if params_per_head <= 0:
        raise ValueError(
            f"trainable_param_budget needs the parameters one head costs, which these scores do not hold "
            f"(params_per_head={params_per_head}): use scores from hifi_fast.score_heads, or set heads_per_layer"
        )
    k = min(num_heads, config.trainable_param_budget // (num_layers * params_per_head))
    if k < 1:
        raise ValueError(
            f"trainable_param_budget={config.trainable_param_budget} is below one head per layer "
            f"({num_layers} layers x {params_per_head} parameters per head)"
        )
    return k


def _top_k(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest values along the last dim, ties to the lower index."""
    return torch.sort(values, dim=-1, descending=True, stable=True).indices[..., :k]


def select_heads(scores: HeadScores, config: HiFiConfig) -> HeadSelection:
    """Select heads by ``config`` from ``scores`` (DESIGN §1.5)."""
    num_layers, num_heads = scores.richness.shape
    k = resolve_heads_per_layer(num_layers, num_heads, scores.params_per_head, config)
    return _select(ranking_scores(scores, config).cpu(), k, config, scores)


def select_random_heads(num_layers: int, num_heads: int, params_per_head: int, config: HiFiConfig) -> HeadSelection:
    """``score="random"`` without a scoring pass: the heads ``select_heads`` picks for that score from
    any scores of a model with this geometry (``hifi_fast.patch`` calls it with the model's)."""
    if config.score != "random":
        raise ValueError(f"select_random_heads: config.score is {config.score!r}; it selects for 'random' only")
    k = resolve_heads_per_layer(num_layers, num_heads, params_per_head, config)
    return _select(random_ranking(num_layers, num_heads, config.seed), k, config, None)


def _select(rank: torch.Tensor, k: int, config: HiFiConfig, scores: HeadScores | None) -> HeadSelection:
    """Top ``k`` of every layer, or the top ``k * L`` overall, of the ``[L, H]`` ranking."""
    num_layers, num_heads = rank.shape
    if config.selection == "per_layer":
        chosen = _top_k(rank, k)
        heads = {layer: chosen[layer].tolist() for layer in range(num_layers)}
    else:
        # task scores are already normalised per layer (L2, as Michel et al.); the other scores by their sum
        layer_sum = rank.sum(dim=-1, keepdim=True) if config.score not in TASK_SCORES else torch.ones_like(rank[..., :1])
        relative = torch.where(layer_sum > 0, rank / layer_sum, torch.zeros_like(rank))
        flat = _top_k(relative.flatten(), k * num_layers).tolist()
        heads = {}
        for index in flat:
            heads.setdefault(index // num_heads, []).append(index % num_heads)
    return HeadSelection(heads, scores)
