"""What flows between the stages: ``HeadScores`` (what the scoring pass measured, per layer and
head) and ``HeadSelection`` (which heads train), both serialisable to JSON."""
from __future__ import annotations

import json
from collections.abc import Mapping
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


class HeadSelection:
    """``{layer index: sorted head indices}``, plus the scores it was chosen by (optional).

    >>> HeadSelection({0: [1, 3], 2: [0]}).heads
    {0: [1, 3], 2: [0]}
    """

    def __init__(self, heads: Mapping[int, list[int]], scores: HeadScores | None = None) -> None:
        normalised: dict[int, list[int]] = {}
        for layer, layer_heads in heads.items():
            layer = _non_negative_int(layer, "layer index")
            indices = [_non_negative_int(h, f"head index of layer {layer}") for h in layer_heads]
            if len(set(indices)) != len(indices):
                raise ValueError(f"HeadSelection: layer {layer} lists a head twice: {list(layer_heads)}")
            if indices:
                normalised[layer] = sorted(indices)
        if not normalised:
            raise ValueError("HeadSelection: selects no head; give at least one {layer: [heads]} entry")
        self.heads = dict(sorted(normalised.items()))
        self.scores = scores

    @property
    def num_heads(self) -> int:
        """Number of selected heads over all layers."""
        return sum(len(h) for h in self.heads.values())

    def to_dict(self) -> dict:
        data: dict = {"heads": {str(k): v for k, v in self.heads.items()}}
        if self.scores is not None:
            data["scores"] = self.scores.to_dict()
        return data

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, data: Mapping) -> "HeadSelection":
        if not isinstance(data, Mapping) or "heads" not in data:
            raise ValueError("HeadSelection.from_json: expected an object with a 'heads' entry")
        scores = HeadScores.from_dict(data["scores"]) if data.get("scores") else None
        return cls({int(k): v for k, v in data["heads"].items()}, scores)

    @classmethod
    def from_json(cls, text: str) -> "HeadSelection":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"HeadSelection.from_json: not valid JSON ({err})") from None
        return cls.from_dict(data)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HeadSelection) and self.heads == other.heads

    def __repr__(self) -> str:
        return f"HeadSelection({self.heads})"


def _non_negative_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"HeadSelection: {what} must be a non-negative integer, got {value!r}")
    return value
