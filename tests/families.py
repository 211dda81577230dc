"""Tiny random models of every family hifi_fast has an adapter for beyond conftest's three, built from
config classes in code (no downloads), as sequence classifiers and, for decoders, causal LMs.

Each ``Family`` states, independently of the package's adapters, where the output projections are
(``o_proj``, for the float64 scoring reference) and the head geometry the adapter must find."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import transformers


class _Lazy:
    """A ``transformers`` class by name, looked up when called: with a ``transformers`` that lacks it,
    the case that builds it is skipped (this file still imports)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, *args, **kwargs):
        cls = getattr(transformers, self.name, None)
        if cls is None:
            pytest.skip(f"transformers {transformers.__version__} has no {self.name}")
        return cls(*args, **kwargs)


class _Transformers:
    def __getattr__(self, name: str) -> _Lazy:
        return _Lazy(name)


tf = _Transformers()
VOCAB = 97
SEQ_CLS, CAUSAL_LM, SEQ2SEQ = "seq_cls", "causal_lm", "seq2seq_lm"
GENERATES = (CAUSAL_LM, SEQ2SEQ)
# Llama-like decoders: 4 query heads in 2 key/value groups (grouped-query attention), head_dim 8.
DECODER = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=48, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=1)
ENCODER = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
               max_position_embeddings=64, pad_token_id=0)


@dataclass(frozen=True)
class Family:
    """``config()``: the tiny config; ``classes``: model class per kind; ``o_proj``: the output
    projection of layer ``{}`` (or the list of them); ``geometry``: ``(layers, heads, kv_heads,
    head_dim)``; ``eos``: the token a sequence classifier needs at the end of every row (encoder-decoder
    classifiers pool there)."""

    name: str
    config: Callable[[], object]
    classes: dict[str, Callable]
    o_proj: dict[str, str | list[str]]
    geometry: tuple[int, int, int, int] = (2, 4, 2, 8)
    adapter: str = ""
    eos: int | None = None


def _encoder_decoder_o_proj(encoder: str, decoder: str, cross: str, blocks: int = 2) -> list[str]:
    """Output projections in hifi_fast's layer order: the encoder's, then per decoder block self, cross."""
    return [encoder.format(i) for i in range(blocks)] + [
        name.format(i) for i in range(blocks) for name in (decoder, cross)]


T5_O = _encoder_decoder_o_proj("encoder.block.{}.layer.0.SelfAttention.o", "decoder.block.{}.layer.0.SelfAttention.o",
                               "decoder.block.{}.layer.1.EncDecAttention.o")
BART_O = _encoder_decoder_o_proj("model.encoder.layers.{}.self_attn.out_proj", "model.decoder.layers.{}.self_attn.out_proj",
                                 "model.decoder.layers.{}.encoder_attn.out_proj")
T5 = dict(vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
          pad_token_id=0, eos_token_id=2, decoder_start_token_id=0)
BART = dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None)


def _decoder(name, config_cls, prefix, causal, seq_cls, adapter, geometry=(2, 4, 2, 8), o="self_attn.o_proj",
             layers="layers", **overrides):
    classes = {CAUSAL_LM: causal}
    o_proj = {CAUSAL_LM: f"{prefix}.{layers}.{{}}.{o}"}
    if seq_cls is not None:
        classes[SEQ_CLS] = seq_cls
        o_proj[SEQ_CLS] = f"{prefix}.{layers}.{{}}.{o}"
    return Family(name, lambda: config_cls(**{**DECODER, **overrides}), classes, o_proj, geometry, adapter)


MOE = dict(num_experts_per_tok=1)
FAMILIES = {f.name: f for f in (
    _decoder("gemma", tf.GemmaConfig, "model", tf.GemmaForCausalLM, tf.GemmaForSequenceClassification, "gemma",
             (2, 4, 2, 16), head_dim=16),
    _decoder("gemma2", tf.Gemma2Config, "model", tf.Gemma2ForCausalLM, tf.Gemma2ForSequenceClassification, "gemma",
             (2, 4, 2, 16), head_dim=16, sliding_window=4),
    _decoder("gemma3_text", tf.Gemma3TextConfig, "model", tf.Gemma3ForCausalLM, tf.Gemma3TextForSequenceClassification,
             "gemma", (2, 4, 2, 16), head_dim=16, sliding_window=4, layer_types=["sliding_attention", "full_attention"]),
    _decoder("mixtral", tf.MixtralConfig, "model", tf.MixtralForCausalLM, tf.MixtralForSequenceClassification, "moe",
             num_local_experts=2, **MOE),
    _decoder("qwen2_moe", tf.Qwen2MoeConfig, "model", tf.Qwen2MoeForCausalLM, tf.Qwen2MoeForSequenceClassification, "moe",
             num_experts=2, moe_intermediate_size=16, shared_expert_intermediate_size=16, **MOE),
    _decoder("qwen3_moe", tf.Qwen3MoeConfig, "model", tf.Qwen3MoeForCausalLM, tf.Qwen3MoeForSequenceClassification, "moe",
             num_experts=2, moe_intermediate_size=16, head_dim=8, **MOE),
    _decoder("olmo2", tf.Olmo2Config, "model", tf.Olmo2ForCausalLM, tf.Olmo2ForSequenceClassification, "olmo2"),
    _decoder("olmo3", tf.Olmo3Config, "model", tf.Olmo3ForCausalLM, tf.Olmo3ForSequenceClassification, "olmo2",
             sliding_window=4),
    _decoder("gpt_oss", tf.GptOssConfig, "model", tf.GptOssForCausalLM, tf.GptOssForSequenceClassification, "gpt_oss",
             num_local_experts=2, head_dim=8, sliding_window=4, **MOE),
    _decoder("granite", tf.GraniteConfig, "model", tf.GraniteForCausalLM, None, "llama_like", attention_multiplier=0.2),
    _decoder("smollm3", tf.SmolLM3Config, "model", tf.SmolLM3ForCausalLM, tf.SmolLM3ForSequenceClassification,
             "llama_like", no_rope_layers=[1, 0]),
    _decoder("glm4", tf.Glm4Config, "model", tf.Glm4ForCausalLM, tf.Glm4ForSequenceClassification, "llama_like",
             head_dim=8),
    _decoder("phi", tf.PhiConfig, "model", tf.PhiForCausalLM, tf.PhiForSequenceClassification, "phi",
             o="self_attn.dense", qk_layernorm=True),
    _decoder("phi3", tf.Phi3Config, "model", tf.Phi3ForCausalLM, tf.Phi3ForSequenceClassification, "phi3"),
    _decoder("gpt_neox", tf.GPTNeoXConfig, "gpt_neox", tf.GPTNeoXForCausalLM, tf.GPTNeoXForSequenceClassification,
             "gpt_neox", (2, 4, 4, 8), o="attention.dense", num_key_value_heads=None),
    _decoder("opt", tf.OPTConfig, "model.decoder", tf.OPTForCausalLM, tf.OPTForSequenceClassification, "opt",
             (2, 4, 4, 8), o="self_attn.out_proj", ffn_dim=48, word_embed_proj_dim=32, num_key_value_heads=None),
    _decoder("gptj", tf.GPTJConfig, "transformer", tf.GPTJForCausalLM, tf.GPTJForSequenceClassification, "gptj",
             (2, 4, 4, 8), o="attn.out_proj", layers="h", rotary_dim=4, num_key_value_heads=None),
    Family("deberta_v2", lambda: tf.DebertaV2Config(
        **ENCODER, relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=8, share_att_key=True,
        norm_rel_ebd="layer_norm"), {SEQ_CLS: tf.DebertaV2ForSequenceClassification},
        {SEQ_CLS: "deberta.encoder.layer.{}.attention.output.dense"}, (2, 4, 4, 8), "deberta_v2"),
    Family("deberta_v2_unshared", lambda: tf.DebertaV2Config(
        **ENCODER, relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=8, share_att_key=False),
        {SEQ_CLS: tf.DebertaV2ForSequenceClassification},
        {SEQ_CLS: "deberta.encoder.layer.{}.attention.output.dense"}, (2, 4, 4, 8), "deberta_v2"),
    Family("modernbert", lambda: tf.ModernBertConfig(
        **ENCODER, cls_token_id=2, sep_token_id=3, bos_token_id=None, eos_token_id=None, global_attn_every_n_layers=2,
        local_attention=4), {SEQ_CLS: tf.ModernBertForSequenceClassification},
        {SEQ_CLS: "model.layers.{}.attn.Wo"}, (2, 4, 4, 8), "modernbert"),
    Family("mpnet", lambda: tf.MPNetConfig(**ENCODER), {SEQ_CLS: tf.MPNetForSequenceClassification},
           {SEQ_CLS: "mpnet.encoder.layer.{}.attention.attn.o"}, (2, 4, 4, 8), "mpnet"),
    # 4 layers sharing 2 groups' weights: hifi_fast's 2 layers, each run twice per forward (initializer_range
    # 0.1: at 0.02 every token's context is nearly the same, see Marian below)
    Family("albert", lambda: tf.AlbertConfig(**{**ENCODER, "num_hidden_layers": 4}, embedding_size=16,
                                             num_hidden_groups=2, initializer_range=0.1),
        {SEQ_CLS: tf.AlbertForSequenceClassification},
        {SEQ_CLS: "albert.encoder.albert_layer_groups.{}.albert_layers.0.attention.dense"}, (2, 4, 4, 8), "albert"),
    Family("big_bird", lambda: tf.BigBirdConfig(**ENCODER, attention_type="original_full"),
           {SEQ_CLS: tf.BigBirdForSequenceClassification},
           {SEQ_CLS: "bert.encoder.layer.{}.attention.output.dense"}, (2, 4, 4, 8), "big_bird"),
)}
# Model types outside hifi_fast's family table that the general adapter patches (test_general_adapter.py
# covers what it refuses).
GENERAL = {f.name: f for f in (
    _decoder("starcoder2", tf.Starcoder2Config, "model", tf.Starcoder2ForCausalLM, tf.Starcoder2ForSequenceClassification,
             "general", use_bias=True),
    _decoder("stablelm", tf.StableLmConfig, "model", tf.StableLmForCausalLM, tf.StableLmForSequenceClassification,
             "general", qk_layernorm=True),
    _decoder("olmo", tf.OlmoConfig, "model", tf.OlmoForCausalLM, None, "general", clip_qkv=5.0),
    _decoder("llama4_text", tf.Llama4TextConfig, "model", tf.Llama4ForCausalLM, None, "general", head_dim=8,
             num_local_experts=2, intermediate_size_mlp=48, **MOE),
    _decoder("exaone4", tf.Exaone4Config, "model", tf.Exaone4ForCausalLM, tf.Exaone4ForSequenceClassification,
             "general"),
    _decoder("nemotron", tf.NemotronConfig, "model", tf.NemotronForCausalLM, tf.NemotronForSequenceClassification,
             "general"),
    _decoder("hunyuan_v1_dense", tf.HunYuanDenseV1Config, "model", tf.HunYuanDenseV1ForCausalLM,
             tf.HunYuanDenseV1ForSequenceClassification, "general", head_dim=8),
    _decoder("ministral", tf.MinistralConfig, "model", tf.MinistralForCausalLM, tf.MinistralForSequenceClassification,
             "general", head_dim=8, sliding_window=4),
    # Falcon-H1: attention and Mamba side by side in every layer (the Mamba mixers stay frozen)
    _decoder("falcon_h1", tf.FalconH1Config, "model", tf.FalconH1ForCausalLM, None, "general", head_dim=8,
             mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8, mamba_d_state=8, mamba_n_groups=1, mamba_chunk_size=4),
    Family("ernie", lambda: tf.ErnieConfig(**ENCODER), {SEQ_CLS: tf.ErnieForSequenceClassification},
           {SEQ_CLS: "ernie.encoder.layer.{}.attention.output.dense"}, (2, 4, 4, 8), "general"),
)}
FAMILIES.update(GENERAL)
# Encoder-decoders: 2 encoder layers, then decoder self- and cross-attention per block: 6 layers of heads.
FAMILIES.update({f.name: f for f in (
    Family("t5", lambda: tf.T5Config(**T5), {SEQ2SEQ: tf.T5ForConditionalGeneration,
                                             SEQ_CLS: tf.T5ForSequenceClassification},
           {SEQ2SEQ: T5_O, SEQ_CLS: ["transformer." + n for n in T5_O]}, (6, 4, 4, 16), "t5", eos=2),
    Family("mt5", lambda: tf.MT5Config(**T5), {SEQ2SEQ: tf.MT5ForConditionalGeneration}, {SEQ2SEQ: T5_O},
           (6, 4, 4, 16), "t5"),
    Family("bart", lambda: tf.BartConfig(**BART), {SEQ2SEQ: tf.BartForConditionalGeneration,
                                                   SEQ_CLS: tf.BartForSequenceClassification},
           {SEQ2SEQ: BART_O, SEQ_CLS: BART_O}, (6, 4, 4, 8), "bart", eos=2),
    Family("mbart", lambda: tf.MBartConfig(**BART), {SEQ2SEQ: tf.MBartForConditionalGeneration}, {SEQ2SEQ: BART_O},
           (6, 4, 4, 8), "bart"),
    # init_std 0.1: at 0.02 their attention is uniform (no embedding norm, sinusoidal positions), every token's
    # context the same, and the float32 CKA of such near-constant outputs is noise
    Family("marian", lambda: tf.MarianConfig(**BART, init_std=0.1), {SEQ2SEQ: tf.MarianMTModel}, {SEQ2SEQ: BART_O},
           (6, 4, 4, 8), "bart"),
    Family("pegasus", lambda: tf.PegasusConfig(**BART, init_std=0.1), {SEQ2SEQ: tf.PegasusForConditionalGeneration},
           {SEQ2SEQ: BART_O}, (6, 4, 4, 8), "bart"),
)})
CASES = [(name, kind) for name, family in FAMILIES.items() for kind in family.classes]


def build(name: str, kind: str, seed: int = 0, num_labels: int = 3) -> torch.nn.Module:
    """The tiny random ``kind`` model of family ``name`` in eval mode."""
    family = FAMILIES[name]
    config = family.config()
    if kind == SEQ_CLS:
        config.num_labels = num_labels
    torch.manual_seed(seed)
    return family.classes[kind](config).eval()


def o_proj_names(name: str, kind: str) -> list[str]:
    family, o_proj = FAMILIES[name], FAMILIES[name].o_proj[kind]
    return list(o_proj) if isinstance(o_proj, list) else [o_proj.format(i) for i in range(family.geometry[0])]


def _padded(generator, rows: int, tokens: int, eos: int | None = None):
    ids = torch.randint(4, VOCAB, (rows, tokens), generator=generator)
    mask = torch.ones(rows, tokens, dtype=torch.long)
    for row, valid in {1: tokens - 4, 3: 3}.items() if rows > 3 else ():
        mask[row, valid:] = 0
        ids[row, valid:] = 0
    if eos is not None:
        ids[torch.arange(rows), mask.sum(1) - 1] = eos
    return ids, mask


def batch(seed: int = 0, rows: int = 4, tokens: int = 11, kind: str = SEQ_CLS, eos: int | None = None) -> dict:
    """Right-padded text (4+ rows: row 1 has ``tokens - 4`` valid tokens, row 3 has 3; fewer rows: no
    padding; ``eos`` ends every row): class labels, next-token labels for a causal LM (padding -100),
    or target text for a sequence-to-sequence LM (7 tokens, padded the same way, -100)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids, mask = _padded(generator, rows, tokens, eos)
    if kind == SEQ_CLS:
        labels = torch.randint(0, 3, (rows,), generator=generator)
    elif kind == CAUSAL_LM:
        labels = input_ids.masked_fill(mask == 0, -100)
    else:
        target, target_mask = _padded(generator, rows, 7)
        labels = target.masked_fill(target_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def sample(name: str, kind: str, seed: int = 0, rows: int = 4, tokens: int = 11) -> dict:
    """``batch`` as family ``name``'s ``kind`` model takes it."""
    return batch(seed, rows, tokens, kind, FAMILIES[name].eos if kind == SEQ_CLS else None)


def model_inputs(model, data: dict, kind: str) -> dict:
    """The forward inputs of ``data`` without its labels; a sequence-to-sequence LM gets the decoder
    inputs its loss would make of them (labels shifted right; mask: labels that are not -100)."""
    inputs = {k: v for k, v in data.items() if k != "labels"}
    if kind == SEQ2SEQ:
        inputs["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=data["labels"])
        inputs["decoder_attention_mask"] = (data["labels"] != -100).long()
    return inputs
