"""The methods HiFi is compared with — LoRA (peft), full fine-tuning and the frozen backbone — set
up one way for the CLI and the benchmarks alike."""
from __future__ import annotations

from torch import nn

from .adapters import get_adapter

LORA_TARGETS = {
    "bert": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "v_proj"],
}


def apply_lora(model: nn.Module, r: int = 8, alpha: int | None = None, dropout: float = 0.0) -> nn.Module:
    """``peft`` LoRA on the query/value projections (GPT-2: the fused ``c_attn``), task head trained
    in full; returns the ``PeftModel``."""
    try:
        from peft import LoraConfig, TaskType, get_peft_model
    except ImportError:
        raise ImportError("the LoRA baseline needs peft (pip install peft)") from None
    adapter = get_adapter(model)
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS, r=r, lora_alpha=2 * r if alpha is None else alpha, lora_dropout=dropout,
        target_modules=LORA_TARGETS[adapter.family], modules_to_save=adapter.default_modules_to_save(model),
    )
    return get_peft_model(model, config)


def train_everything(model: nn.Module) -> nn.Module:
    """Full fine-tuning: every parameter trains."""
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def freeze_backbone(model: nn.Module, input_grads: bool = False) -> nn.Module:
    """Only the task head trains. ``input_grads=True`` still back-propagates through the whole
    backbone (to the embeddings' output): the lower bound of any method that trains inside it."""
    heads = set(get_adapter(model).default_modules_to_save(model))
    for name, param in model.named_parameters():
        param.requires_grad_(name.split(".")[0] in heads)
    if input_grads:
        model.enable_input_require_grads()
    return model
