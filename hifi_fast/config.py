"""User-facing configuration of a HiFi run (DESIGN §1.5)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

SCORES = ("pagerank", "richness", "correlation", "random", "importance", "gradient")
TASK_SCORES = ("importance", "gradient")  # scored from the task's loss: labelled batches, warm-up
WARMUP_STEPS = 200
WARMUP_LR = 1e-3
SELECTIONS = ("per_layer", "global")
# The defaults the selection study supports (docs/selection_study.md): no score beat random heads at
# 64 to 6,000 examples, and 1 head per layer did worse than 2 with few examples. Random heads need
# no scoring pass, so ``hifi_fast.patch(model)`` needs nothing but the model.
DEFAULT_HEADS_PER_LAYER = 2
DEFAULT_SCORE = "random"


@dataclass
class HiFiConfig:
    """How heads are scored, how many are selected and what else trains.

    Args:
        heads_per_layer: ``k``, the heads trained per layer (``k * L`` in all for ``selection="global"``);
            default 2 (``DEFAULT_HEADS_PER_LAYER``) unless ``trainable_param_budget`` is set.
        trainable_param_budget: instead of ``k``, the largest ``k`` whose head slices fit this many
            parameters (task head not counted). Setting both is an error.
        score: how heads are ranked; default ``"random"`` (no scoring pass), the choice the selection
            study supports (``docs/selection_study.md``: no score beat random heads).

            - ``"pagerank"`` (HiFi; DESIGN §1.4): personalised PageRank per layer on the
              graph whose edge weights are the heads' mean linear CKA (no self loops, columns
              normalised), with the heads' information richness (mean singular-value entropy)
              normalised to sum 1 as the teleport vector: ``s = (1 - d) v + d P s``. The paper's
              method section could not be read to check this form equation by equation; see
              ``docs/paper_comparison.md``.
            - ``"richness"``, ``"correlation"`` (PageRank with a uniform teleport), ``"random"``
              (seeded): the paper's ablations. ``"random"`` depends on the model's shape and
              ``seed`` only, so ``patch`` runs no scoring pass for it (no batches needed).
            - ``"importance"``: task-aware gradient importance (Michel, Levy & Neubig 2019): the
              mean over the scoring examples of ``|dL/d xi_h|`` for a gate ``xi_h = 1`` on each
              head's output, normalised per layer by its L2 norm across heads. Needs labelled
              scoring batches (causal LMs: the text itself) and scores computed with
              ``score_heads(..., importance=True)`` (or ``score_for_config``); the task head is
              first warmed up by a linear probe (``importance_warmup_steps``) and, by default, kept.
            - ``"gradient"``: task-aware, the size of the first step fine-tuning would take on each
              head (as Sparse Matrix Tuning picks blocks, He et al. 2024): the L1 norm of the loss
              gradient over the slices the head trains (Q rows, its K/V group's rows, O columns),
              per scoring batch, averaged; normalised per layer as ``"importance"``. Same needs,
              warm-up and ``score_heads(..., gradient=True)``; under Adam the first update of a
              block lowers the loss by about ``lr`` times that norm.
        selection: ``"per_layer"`` (top ``k`` of every layer) or ``"global"`` (top ``k * L`` overall,
            each score divided by its layer's sum; for the task scores, by its layer's L2 norm).
        num_scoring_examples: examples the scoring pass reads.
        damping: PageRank damping ``d``.
        seed: seed of ``score="random"``.
        modules_to_save: names of modules trained in full beside the head slices. ``None`` means the
            architecture's task head (``classifier``/``score``); ``[]`` trains head slices only.
        master_dtype: dtype of the trainable slices (e.g. ``torch.float32`` master copies for a bf16
            model, so small updates are not rounded away); ``None``: the model's dtype.
        importance_warmup_steps: ``score="importance"`` or ``"gradient"``: AdamW steps that train the task head alone
            (backbone frozen) on the scoring examples before the gradients are taken, so the loss
            comes from a head that has learnt something. 0 skips it; models without a separate task
            head (causal LMs) skip it.
        importance_warmup_lr: learning rate of that warm-up.
        keep_warmed_head: ``score="importance"`` or ``"gradient"``: fine-tuning starts from the warmed task head
            (``True``) or from the head as it was before scoring (``False``: the warm-up serves the
            scores only, and the model leaves the scoring pass as it came in).
    """

    heads_per_layer: int | None = None
    trainable_param_budget: int | None = None
    score: str = DEFAULT_SCORE
    selection: str = "per_layer"
    num_scoring_examples: int = 256
    damping: float = 0.85
    seed: int = 0
    modules_to_save: list[str] | None = field(default=None)
    master_dtype: torch.dtype | None = None
    importance_warmup_steps: int = WARMUP_STEPS
    importance_warmup_lr: float = WARMUP_LR
    keep_warmed_head: bool = True

    def __post_init__(self) -> None:
        if self.trainable_param_budget is not None:
            if self.heads_per_layer is not None:
                raise ValueError(
                    "HiFiConfig: set either heads_per_layer or trainable_param_budget, not both"
                )
            _check_positive_int("trainable_param_budget", self.trainable_param_budget)
        else:
            if self.heads_per_layer is None:
                self.heads_per_layer = DEFAULT_HEADS_PER_LAYER
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
        check_warmup(self.importance_warmup_steps, self.importance_warmup_lr, "HiFiConfig: importance_warmup")
        if not isinstance(self.keep_warmed_head, bool):
            raise ValueError(f"HiFiConfig: keep_warmed_head must be True or False, got {self.keep_warmed_head!r}")

    def to_dict(self) -> dict:
        data = asdict(self)
        data["master_dtype"] = None if self.master_dtype is None else str(self.master_dtype).replace("torch.", "")
        return data


def check_warmup(steps: object, lr: object, what: str) -> None:
    """``steps`` an integer >= 0 and ``lr`` a positive finite number, or a ``ValueError`` naming ``what``."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"{what}_steps must be an integer >= 0, got {steps!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0.0 < lr < float("inf"):
        raise ValueError(f"{what}_lr must be a positive number, got {lr!r}")


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"HiFiConfig: {name} must be an integer >= 1, got {value!r}")
