"""Encoders used for classification beyond BERT's layout: DeBERTa-v2/v3, ModernBERT, MPNet, BigBird."""
from .base import ArchitectureAdapter
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
    """BigBird: BERT's layout, in full or block-sparse attention (the same projections either way)."""

    family = "big_bird"
    model_types = ("big_bird",)
