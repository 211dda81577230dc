"""Encoder-decoders: T5 / Flan-T5 / mT5 and BART-style models (BART, mBART, Marian, Pegasus).

Every attention module is its own layer of heads: first the encoder's self-attention layers
(``0 .. E-1``), then for each decoder block its self-attention and its cross-attention
(``E + 2i`` and ``E + 2i + 1``). ``HeadSelection`` layer indices, ``HeadScores`` rows and checkpoints
count layers this way. Head ``h`` of a cross-attention layer is the head whose query reads the
decoder and whose key and value read the encoder's output: it trains its rows of ``q``, ``k``, ``v``
there and its input columns of the output projection, as any head does.

Scoring reads the encoder layers over the input tokens (``attention_mask``) and the decoder layers
over the decoder tokens: ``decoder_input_ids`` (else ``labels`` shifted right, as the model's loss
does) with ``decoder_attention_mask`` (else the positions whose label is not -100).
"""
from __future__ import annotations

from dataclasses import replace

from torch import nn

from .base import ArchitectureAdapter, AttentionLayer, UnsupportedModelError

DECODER_MASK = "decoder_attention_mask"


class EncoderDecoderAdapter(ArchitectureAdapter):
    """Subclasses name the three stacks' attention modules (``encoder_pattern``, ``decoder_pattern``,
    ``cross_pattern``) and the config attribute with the decoder's head count."""

    encoder_pattern: str = ""
    decoder_pattern: str = ""
    cross_pattern: str = ""
    decoder_heads_attr: str = ""

    def check(self, model: nn.Module) -> None:
        config = model.config
        encoder, decoder = getattr(config, self.heads_attr), getattr(config, self.decoder_heads_attr)
        if encoder != decoder:
            raise UnsupportedModelError(
                f"hifi_fast does not patch {type(model).__name__}: its encoder has {encoder} heads per layer and its "
                f"decoder {decoder}; HiFi scores, selects and saves one head count per model")
        if not self.find_layers(model, self.encoder_pattern) and self.find_layers(model, self.cross_pattern):
            raise UnsupportedModelError(
                f"hifi_fast does not patch {type(model).__name__}: a decoder without its encoder never runs its "
                "cross-attention layers, which HiFi would score and select")

    def layers(self, model: nn.Module) -> list[AttentionLayer]:
        encoder = self.find_layers(model, self.encoder_pattern)
        decoder = self.find_layers(model, self.decoder_pattern, mask=DECODER_MASK)
        cross = {layer.index: layer for layer in self.find_layers(model, self.cross_pattern, mask=DECODER_MASK)}
        ordered = encoder + [layer for own in decoder for layer in (own, cross.get(own.index)) if layer is not None]
        return [replace(layer, index=i) for i, layer in enumerate(ordered)]


class T5Adapter(EncoderDecoderAdapter):
    """T5, Flan-T5 (``t5``), mT5: bias-free ``q``/``k``/``v``/``o`` of ``num_heads`` heads of ``d_kv``
    (``num_heads * d_kv`` need not be ``d_model``). The relative position biases (one scalar per head
    and bucket, held by the first block of each stack) stay frozen. ``T5EncoderModel`` has the encoder
    layers only."""

    family = "t5"
    model_types = ("t5", "mt5")
    encoder_pattern = r"encoder\.block\.(\d+)\.layer\.0\.SelfAttention"
    decoder_pattern = r"decoder\.block\.(\d+)\.layer\.0\.SelfAttention"
    cross_pattern = r"decoder\.block\.(\d+)\.layer\.1\.EncDecAttention"
    q, k, v, o = "q", "k", "v", "o"
    heads_attr = decoder_heads_attr = "num_heads"
    task_heads = ("classification_head",)


class BartAdapter(EncoderDecoderAdapter):
    """BART, mBART, Marian, Pegasus: biased ``q_proj``/``k_proj``/``v_proj``/``out_proj`` in
    ``self_attn`` (encoder and decoder) and ``encoder_attn`` (decoder cross-attention)."""

    family = "bart"
    model_types = ("bart", "mbart", "marian", "pegasus")
    encoder_pattern = r"encoder\.layers\.(\d+)\.self_attn"
    decoder_pattern = r"decoder\.layers\.(\d+)\.self_attn"
    cross_pattern = r"decoder\.layers\.(\d+)\.encoder_attn"
    q, k, v, o = "q_proj", "k_proj", "v_proj", "out_proj"
    heads_attr, decoder_heads_attr = "encoder_attention_heads", "decoder_attention_heads"
    task_heads = ("classification_head",)
