"""``HeadScores``: what the scoring pass measured, per layer and head."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class HeadScores:
    """Scores of every attention head (``L`` layers x ``H`` query heads).

    Attributes:
        richness: ``[L, H]`` mean singular-value entropy of the head's output (DESIGN §1.2).
        correlation: ``[L, H, H]`` mean linear CKA between heads of a layer, diagonal 1 (§1.3).
        pagerank: ``[L, H]`` PageRank with richness as teleport (§1.4).
        num_examples: examples the statistics were averaged over.
        damping: the damping ``pagerank`` was computed with.
        params_per_head: trainable parameters one selected head costs at most (Q/K/V rows, O columns).
    """

    richness: torch.Tensor
    correlation: torch.Tensor
    pagerank: torch.Tensor
    num_examples: int
    damping: float = 0.85
    params_per_head: int = 0

    def to_dict(self) -> dict:
        return {
            "richness": self.richness.tolist(),
            "correlation": self.correlation.tolist(),
            "pagerank": self.pagerank.tolist(),
            "num_examples": self.num_examples,
            "damping": self.damping,
            "params_per_head": self.params_per_head,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "HeadScores":
        return cls(
            richness=torch.tensor(data["richness"], dtype=torch.float64),
            correlation=torch.tensor(data["correlation"], dtype=torch.float64),
            pagerank=torch.tensor(data["pagerank"], dtype=torch.float64),
            num_examples=int(data["num_examples"]),
            damping=float(data["damping"]),
            params_per_head=int(data["params_per_head"]),
        )
