"""hifi_fast: fine-tune Hugging Face transformers by training only a few attention heads (HiFi).

>>> import hifi_fast
>>> model = hifi_fast.patch(model)  # 2 random heads per layer (the default), no scoring pass
>>> # or HiFi's PageRank selection, scored on batches (dicts of input_ids/attention_mask):
>>> model = hifi_fast.patch(model, hifi_fast.HiFiConfig(score="pagerank"), batches)
"""
from .adapters import SUPPORTED_MODEL_TYPES, UnsupportedModelError, describe
from .checkpoint import CheckpointMismatchError, load, save
from .config import HiFiConfig
from .guard import NonFiniteGuard, NonFiniteStepError
from .patching import count_parameters, is_patched, patch, print_trainable_parameters, unpatch
from .scores import HeadScores
from .scoring import score_heads
from .selection import HeadSelection, select_heads
from .swap import swap

__version__ = "0.1.0"

__all__ = [
    "SUPPORTED_MODEL_TYPES", "CheckpointMismatchError", "HeadScores", "HeadSelection", "HiFiConfig", "NonFiniteGuard",
    "NonFiniteStepError", "UnsupportedModelError",
    "count_parameters", "describe", "is_patched", "load", "patch", "print_trainable_parameters", "save",
    "score_heads", "select_heads", "swap", "unpatch",
]
