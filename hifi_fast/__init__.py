"""hifi_fast: fine-tune Hugging Face transformers by training only a few attention heads (HiFi).

>>> import hifi_fast
>>> model = hifi_fast.patch(model)  # 2 random heads per layer (the default), no scoring pass
>>> # or HiFi's PageRank selection, scored on batches (dicts of input_ids/attention_mask):
>>> model = hifi_fast.patch(model, hifi_fast.HiFiConfig(score="pagerank"), batches)

The package's stages (``docs/ARCHITECTURE.md``): ``selecting`` (scores -> which heads),
``tuning`` (those heads' slices trainable, the per-step hot path), ``storing`` (checkpoints, task
switching, training state) and ``cli``; ``api.patch`` joins selecting and tuning.
"""
from ._version import __version__
from .adapters import SUPPORTED_MODEL_TYPES, UnsupportedModelError, describe
from .api import patch
from .config import HiFiConfig
from .heads import HeadScores, HeadSelection
from .selecting.scoring import score_heads
from .selecting.selection import select_heads
from .storing.checkpoint import CheckpointMismatchError, load, save
from .storing.swap import swap
from .tuning.guard import NonFiniteGuard, NonFiniteStepError
from .tuning.patching import count_parameters, is_patched, print_trainable_parameters, unpatch

__all__ = [
    "SUPPORTED_MODEL_TYPES", "CheckpointMismatchError", "HeadScores", "HeadSelection", "HiFiConfig", "NonFiniteGuard",
    "NonFiniteStepError", "UnsupportedModelError", "__version__",
    "count_parameters", "describe", "is_patched", "load", "patch", "print_trainable_parameters", "save",
    "score_heads", "select_heads", "swap", "unpatch",
]
