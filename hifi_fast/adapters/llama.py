"""Llama-style decoders with grouped-query attention: Llama, Mistral, Qwen2, Qwen3."""
from .base import ArchitectureAdapter


class LlamaAdapter(ArchitectureAdapter):
    family = "llama"
    model_types = ("llama", "mistral", "qwen2", "qwen3")
    layer_pattern = r"layers\.(\d+)\.self_attn"
    q, k, v, o = "q_proj", "k_proj", "v_proj", "o_proj"
    kv_heads_attr = "num_key_value_heads"
    task_heads = ("score",)
