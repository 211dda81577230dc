"""Encoders used for classification beyond BERT's layout: DeBERTa-v2/v3, ModernBERT, MPNet, BigBird, ALBERT."""
from __future__ import annotations

from dataclasses import replace

from torch import nn

from .base import ArchitectureAdapter, AttentionLayer
from .bert import BertAdapter


class DebertaV2Adapter(ArchitectureAdapter):
    """DeBERTa-v2 and -v3 (disentangled attention). With ``share_att_key`` (v3, v2-xlarge) the
    relative position keys and queries of head ``h`` are its own rows of ``key_proj``/``query_proj``
    applied to the relative embeddings, so they train with the head; without it, ``pos_key_proj`` /
    ``pos_query_proj`` hold them, and head ``h``'s rows there train with it too (``extra_rows``). The
    relative embeddings themselves are shared by every head and stay frozen. ``pooler`` and
    ``classifier`` are new in a fine-tuned DeBERTa and train in full."""

    family = "deberta_v2"
    model_types = ("deberta-v2",)
    layer_pattern = r"encoder\.layer\.(\d+)\.attention"
    q, k, v, o = "self.query_proj", "self.key_proj", "self.value_proj", "output.dense"
    extra_rows = ("self.pos_key_proj", "self.pos_query_proj")
    task_heads = ("pooler", "classifier")


class ModernBertAdapter(ArchitectureAdapter):
    """ModernBERT: one fused ``Wqkv`` laid out ``[Q | K | V]`` and an output ``Wo`` under
    ``layers.N.attn`` (global and sliding-window layers alike). ``classifier`` trains; ``head`` (dense
    + norm) comes pretrained with the masked-LM head and stays frozen unless named in
    ``modules_to_save``."""

    family = "modernbert"
    model_types = ("modernbert",)
    layer_pattern = r"layers\.(\d+)\.attn"
    qkv, o = "Wqkv", "Wo"
    task_heads = ("classifier",)


class MPNetAdapter(ArchitectureAdapter):
    """MPNet: ``q``/``k``/``v``/``o`` under ``encoder.layer.N.attention.attn``; the relative position
    bias (one scalar per head and bucket, shared by all layers) stays frozen."""

    family = "mpnet"
    model_types = ("mpnet",)
    layer_pattern = r"encoder\.layer\.(\d+)\.attention\.attn"
    q, k, v, o = "q", "k", "v", "o"
    task_heads = ("classifier",)


class BigBirdAdapter(BertAdapter):
    """BigBird: BERT's layout, in full or block-sparse attention (the same projections either way;
    block-sparse pads the input to a multiple of its block itself)."""

    family = "big_bird"
    model_types = ("big_bird",)
    pads_inputs = True


class AlbertAdapter(ArchitectureAdapter):
    """ALBERT: its ``num_hidden_layers`` layers share the weights of ``num_hidden_groups`` groups of
    ``inner_group_num`` layers (one group of one layer in every released ALBERT: a single attention
    module run 12 or 24 times). A hifi_fast layer is one such shared module, in group order, and
    head ``h`` of it is head ``h`` at every depth the module runs at: its slices train on the gradient
    summed over those runs, and scoring averages its statistics over them
    (``AttentionLayer.applications``). ``classifier`` trains; the pooler comes pretrained."""

    family = "albert"
    model_types = ("albert",)
    q, k, v, o = "query", "key", "value", "dense"
    task_heads = ("classifier",)

    def layers(self, model: nn.Module) -> list[AttentionLayer]:
        config = model.config
        depth, groups = config.num_hidden_layers, config.num_hidden_groups
        runs = [sum(1 for i in range(depth) if int(i / (depth / groups)) == g) for g in range(groups)]  # as ALBERT
        layers: list[AttentionLayer] = []
        for group in range(groups):
            for layer in self.find_layers(model, rf"albert_layer_groups\.{group}\.albert_layers\.(\d+)\.attention"):
                layers.append(replace(layer, index=len(layers), applications=runs[group]))
        return layers
