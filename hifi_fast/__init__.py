"""hifi_fast: fine-tune Hugging Face transformers by training only a few attention heads (HiFi).

>>> import hifi_fast
>>> scores = hifi_fast.score_heads(model, batches)
>>> selection = hifi_fast.select_heads(scores, hifi_fast.HiFiConfig(score="pagerank", heads_per_layer=2))
>>> model = hifi_fast.patch(model, selection)
"""
from .adapters import SUPPORTED_MODEL_TYPES, UnsupportedModelError
from .checkpoint import load, save
from .config import HiFiConfig
from .guard import NonFiniteGuard, NonFiniteStepError
from .patching import count_parameters, is_patched, patch, print_trainable_parameters, unpatch
from .scores import HeadScores
from .scoring import score_heads
from .selection import HeadSelection, select_heads
from .swap import swap

__version__ = "0.1.0"

__all__ = [
    "SUPPORTED_MODEL_TYPES", "HeadScores", "HeadSelection", "HiFiConfig", "NonFiniteGuard", "NonFiniteStepError",
    "UnsupportedModelError",
    "count_parameters", "is_patched", "load", "patch", "print_trainable_parameters", "save",
    "score_heads", "select_heads", "swap", "unpatch",
]
