"""GPT-2: one fused ``c_attn`` Conv1D (weight ``d x 3d``) for Q/K/V and a ``c_proj`` output."""
from .base import ArchitectureAdapter


class GPT2Adapter(ArchitectureAdapter):
    family = "gpt2"
    model_types = ("gpt2",)
    layer_pattern = r"\bh\.(\d+)\.attn"
    qkv, o = "c_attn", "c_proj"
    heads_attr = "n_head"
    task_heads = ("score",)
    unmapped_cross_attention = r"\bh\.\d+\.crossattention"
