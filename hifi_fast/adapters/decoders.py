"""Decoder families whose attention is Llama's (separate ``q_proj``/``k_proj``/``v_proj`` and an output
projection under ``layers.N.self_attn``, grouped-query heads from ``num_key_value_heads``), and the
older decoders with separate projections (OPT, GPT-J). Per-head extras inside attention (rotary on
part of a head, soft-capped logits, per-head q/k norms, sliding windows, NoPE layers) act on each
head alone and need nothing here."""
from .base import ArchitectureAdapter
from .llama import LlamaAdapter


class GemmaAdapter(LlamaAdapter):
    """Gemma, Gemma 2, Gemma 3 text (``Gemma3ForCausalLM``, ``Gemma3TextForSequenceClassification``).
    ``head_dim`` is the config's (256 for 2B/7B/9B), not ``hidden_size / num_attention_heads``: Q/O
    are ``num_attention_heads * head_dim`` wide, and a head is ``head_dim`` rows of Q (and of its K/V
    group) and ``head_dim`` input columns of O. Gemma 3's ``q_norm``/``k_norm`` normalise each head
    alone."""

    family = "gemma"
    model_types = ("gemma", "gemma2", "gemma3_text")


class MoEAdapter(LlamaAdapter):
    """Mixture-of-experts decoders: Mixtral, Qwen2-MoE, Qwen3-MoE. Only attention heads train: the
    experts, their router and Qwen2-MoE's shared expert stay frozen."""

    family = "moe"
    model_types = ("mixtral", "qwen2_moe", "qwen3_moe")


class OLMo2Adapter(LlamaAdapter):
    """OLMo 2 and OLMo 3 (OLMo 2's attention, with sliding-window layers). Their ``q_norm``/``k_norm``
    are RMS norms over *all* heads' queries (keys) together, not per head: a selected head's Q/K rows
    also change, by one scalar per token, the scale of every other head's query (key). The trainable
    parameters are exactly the selected heads' slices, as everywhere; what a head's slices touch is a
    little wider than in Llama."""

    family = "olmo2"
    model_types = ("olmo2", "olmo3")
    qk_norm_spans_heads = True


class LlamaLikeAdapter(LlamaAdapter):
    """Granite (scaled attention and residuals), SmolLM3 (NoPE layers), GLM-4 (partial rotary, Q/K/V
    biases, ``head_dim`` from the config)."""

    family = "llama_like"
    model_types = ("granite", "smollm3", "glm4")


class GptOssAdapter(LlamaAdapter):
    """gpt-oss: biased ``q_proj``/``k_proj``/``v_proj``/``o_proj``, grouped-query heads, sliding and
    full layers. Each head's learned attention sink (``self_attn.sinks``, one logit per head) acts on
    that head alone and stays frozen; so do the experts."""

    family = "gpt_oss"
    model_types = ("gpt_oss",)


class PhiAdapter(LlamaAdapter):
    """Phi-1/1.5/2: separate biased projections, output projection ``dense``, partial rotary; the
    optional ``q_layernorm``/``k_layernorm`` act on each head alone."""

    family = "phi"
    model_types = ("phi",)
    o = "dense"


class Phi3Adapter(ArchitectureAdapter):
    """Phi-3 / Phi-3.5 (and Phi-4 text, same model type): one fused ``qkv_proj`` laid out
    ``[Q | K | V]`` with grouped-query attention; a head trains its Q rows and its K/V group's rows
    of ``qkv_proj`` and its input columns of ``o_proj``."""

    family = "phi3"
    model_types = ("phi3",)
    layer_pattern = r"layers\.(\d+)\.self_attn"
    qkv, o = "qkv_proj", "o_proj"
    kv_heads_attr = "num_key_value_heads"
    task_heads = ("score",)


class OPTAdapter(ArchitectureAdapter):
    """OPT: biased ``q_proj``/``k_proj``/``v_proj``/``out_proj`` under ``decoder.layers.N.self_attn``."""

    family = "opt"
    model_types = ("opt",)
    layer_pattern = r"decoder\.layers\.(\d+)\.self_attn"
    q, k, v, o = "q_proj", "k_proj", "v_proj", "out_proj"
    task_heads = ("score",)


class GPTJAdapter(ArchitectureAdapter):
    """GPT-J: ``q_proj``/``k_proj``/``v_proj``/``out_proj`` without biases under ``h.N.attn``; rotary on
    the first ``rotary_dim`` features of each head."""

    family = "gptj"
    model_types = ("gptj",)
    layer_pattern = r"\bh\.(\d+)\.attn"
    q, k, v, o = "q_proj", "k_proj", "v_proj", "out_proj"
    task_heads = ("score",)
