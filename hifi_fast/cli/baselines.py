"""The methods HiFi is compared with — LoRA (peft), full fine-tuning and the frozen backbone — set
up one way for the CLI and the benchmarks alike."""
from __future__ import annotations

from torch import nn

from ..adapters import attention_layers, get_adapter


def lora_targets(model: nn.Module, projections: str = "qv") -> list[str]:
    """Full module names of the attention projections ``projections`` (letters of ``"qkvo"``) in every
    layer; a fused Q/K/V projection (GPT-2's ``c_attn``) stands for each of q, k and v."""
    if not projections or set(projections) - set("qkvo"):
        raise ValueError(f"LoRA projections must be letters of 'qkvo', got {projections!r}")
    names: list[str] = []
    for layer in attention_layers(model):
        for part in projections:
            name = getattr(layer, part) or layer.qkv
            if name not in names:
                names.append(name)
    return names


def apply_lora(model: nn.Module, r: int = 8, alpha: int | None = None, dropout: float = 0.0,
               projections: str = "qv", task_type: str = "SEQ_CLS") -> nn.Module:
    """``peft`` LoRA on the attention projections ``projections`` (default query/value, peft's usual
    targets; GPT-2: the fused ``c_attn``), task head trained in full; returns the ``PeftModel``
    (``task_type``: peft's ``TaskType`` name, e.g. ``"CAUSAL_LM"``)."""
    try:
        from peft import LoraConfig, TaskType, get_peft_model
    except ImportError:
        raise ImportError("the LoRA baseline needs peft (pip install peft)") from None
    adapter = get_adapter(model)
    config = LoraConfig(
        task_type=TaskType[task_type], r=r, lora_alpha=2 * r if alpha is None else alpha, lora_dropout=dropout,
        target_modules=lora_targets(model, projections), modules_to_save=adapter.default_modules_to_save(model),
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
