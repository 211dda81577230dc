"""User-facing configuration of a HiFi run (DESIGN §1.5)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

SCORES = ("pagerank", "richness", "correlation", "random")
SELECTIONS = ("per_layer", "global")


@dataclass
class HiFiConfig:
    """How heads are scored, how many are selected and what else trains.

    Args:
        heads_per_layer: ``k``, the heads trained per layer (``k * L`` in all for ``selection="global"``).
        trainable_param_budget: instead of ``k``, the largest ``k`` whose head slices fit this many
            parameters (task head not counted). Setting both is an error.
        score: ``"pagerank"`` (HiFi), or the paper's ablations ``"richness"``, ``"correlation"``,
            ``"random"``.
        selection: ``"per_layer"`` (top ``k`` of every layer) or ``"global"`` (top ``k * L`` overall,
            each score divided by its layer's sum).
        num_scoring_examples: examples the scoring pass reads.
        damping: PageRank damping ``d``.
        seed: seed of ``score="random"``.
        modules_to_save: names of modules trained in full beside the head slices. ``None`` means the
            architecture's task head (``classifier``/``score``); ``[]`` trains head slices only.
        master_dtype: dtype of the trainable slices (e.g. ``torch.float32`` master copies for a bf16
            model, so small updates are not rounded away); ``None``: the model's dtype.
    """

    heads_per_layer: int | None = 1
    trainable_param_budget: int | None = None
    score: str = "pagerank"
    selection: str = "per_layer"
    num_scoring_examples: int = 256
    damping: float = 0.85
    seed: int = 0
    modules_to_save: list[str] | None = field(default=None)
    master_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if self.trainable_param_budget is not None:
            if self.heads_per_layer not in (None, 1):
                raise ValueError(
                    "HiFiConfig: set either heads_per_layer or trainable_param_budget, not both"
                )
            self.heads_per_layer = None
            _check_positive_int("trainable_param_budget", self.trainable_param_budget)
        elif self.heads_per_layer is None:
            raise ValueError("HiFiConfig: one of heads_per_layer or trainable_param_budget is required")
        else:
            _check_positive_int("heads_per_layer", self.heads_per_layer)
        if self.score not in SCORES:
            raise ValueError(f"HiFiConfig: score={self.score!r} is not one of {SCORES}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"HiFiConfig: selection={self.selection!r} is not one of {SELECTIONS}")
        _check_positive_int("num_scoring_examples", self.num_scoring_examples)
        if self.master_dtype is not None and not (
            isinstance(self.master_dtype, torch.dtype) and self.master_dtype.is_floating_point
        ):
            raise ValueError(f"HiFiConfig: master_dtype must be a floating torch.dtype, got {self.master_dtype!r}")
        if not 0.0 <= self.damping < 1.0:
            raise ValueError(f"HiFiConfig: damping must be in [0, 1), got {self.damping}")

    def to_dict(self) -> dict:
        data = asdict(self)
        data["master_dtype"] = None if self.master_dtype is None else str(self.master_dtype).replace("torch.", "")
        return data


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"HiFiConfig: {name} must be an integer >= 1, got {value!r}")
