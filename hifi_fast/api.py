"""``hifi_fast.patch``: the drop-in call, above both stages it joins — selecting the heads (for a
``HiFiConfig``) and making them trainable (``tuning``)."""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .config import HiFiConfig
from .heads import HeadSelection
from .selecting.scoring import select_for_config
from .tuning.patching import is_patched, patch_selection


def patch(
    model: nn.Module,
    selection: HeadSelection | HiFiConfig | None = None,
    batches: Iterable[dict] | None = None,
    modules_to_save: list[str] | None = None,
    master_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Make only the selected heads' Q/K/V/O slices and the task head trainable, in place.

    ``patch(model)`` trains 2 random heads per layer (seeded, no scoring pass: ``HiFiConfig()``'s
    defaults, which the selection study supports); ``patch(model, HiFiConfig(score="pagerank"), batches)``
    selects HiFi's way.

    Args:
        model: a supported ``transformers`` model (see ``hifi_fast.SUPPORTED_MODEL_TYPES``).
        selection: a ``HeadSelection``, or a ``HiFiConfig`` to select by (scoring ``batches`` unless its
            score is ``"random"``); ``None``: ``HiFiConfig()``.
        batches: scoring batches (dicts with ``input_ids``/``attention_mask``, or ``pixel_values``), with a config
            only; ``score="random"`` needs none (no scoring pass).
        modules_to_save: modules trained in full; default: the config's, else the task head.
        master_dtype: dtype of the trainable slices; default: the config's, else the model's.

    Returns:
        ``model``, patched: its trainable parameters are the slices (``*.hifi_weight``,
        ``*.hifi_bias``) and the task head.
    """
    if is_patched(model):  # before any scoring pass
        raise ValueError("model is already patched by hifi_fast; call hifi_fast.unpatch(model) first")
    if selection is None:
        selection = HiFiConfig()
    if isinstance(selection, HiFiConfig):
        config = selection
        selection = select_for_config(model, batches, config)
        if modules_to_save is None:
            modules_to_save = config.modules_to_save
        if master_dtype is None:
            master_dtype = config.master_dtype
    return patch_selection(model, selection, modules_to_save, master_dtype)
