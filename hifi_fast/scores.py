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
        importance: ``[L, H]`` mean over the scoring examples of ``|dL/d xi_h|``, the loss's
            sensitivity to a gate on the head's output (Michel et al. 2019), not normalised; ``None``
            unless the scores were computed with ``importance=True``.
        gradient: ``[L, H]`` the L1 norm of the loss gradient over the slices the head would train
            (Q rows, its K/V group's rows, O columns), per scoring batch of summed losses, summed
            over the batches and divided by the examples; ``None`` unless computed with ``gradient=True``.
    """

    richness: torch.Tensor
    correlation: torch.Tensor
    pagerank: torch.Tensor
    num_examples: int
    damping: float = 0.85
    params_per_head: int = 0
    importance: torch.Tensor | None = None
    gradient: torch.Tensor | None = None

    def to_dict(self) -> dict:
        data = {
            "richness": self.richness.tolist(),
            "correlation": self.correlation.tolist(),
            "pagerank": self.pagerank.tolist(),
            "num_examples": self.num_examples,
            "damping": self.damping,
            "params_per_head": self.params_per_head,
        }
        for name in ("importance", "gradient"):  # absent, the dict reads as older versions wrote it
            if getattr(self, name) is not None:
                data[name] = getattr(self, name).tolist()
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "HeadScores":
        """Read a ``to_dict`` result, older ones (no ``importance``/``gradient``) included."""
        optional = {name: None if data.get(name) is None else torch.tensor(data[name], dtype=torch.float64)
                    for name in ("importance", "gradient")}
        return cls(
            richness=torch.tensor(data["richness"], dtype=torch.float64),
            correlation=torch.tensor(data["correlation"], dtype=torch.float64),
            pagerank=torch.tensor(data["pagerank"], dtype=torch.float64),
            num_examples=int(data["num_examples"]),
            damping=float(data["damping"]),
            params_per_head=int(data["params_per_head"]),
            **optional,
        )
