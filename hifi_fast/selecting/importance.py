"""Task-aware head importance (Michel, Levy & Neubig 2019, "Are Sixteen Heads Really Better than One?").

Each head's context output ``C_h`` (the per-head slice of the output projection's input, where the
scoring pass already hooks) is multiplied by a gate ``xi_h = 1``. The importance of head ``h`` is the
expected sensitivity of the loss to that gate, ``I_h = E_x |dL(x)/d xi_h|``: gates are per example
(``xi[b, h]``), so one backward of the summed per-example losses gives every ``dL(x_b)/d xi[b, h]``
at once (examples do not interact in an eval-mode forward). Only the gates require grad; the
backbone's weights stay frozen.

The loss needs a trained task head: a randomly initialised classifier makes ``dL/d xi`` noise. So a
model with a separate task head (``classifier``/``score``) first gets a short linear-probe warm-up
(``warm_up_task_head``: AdamW on the task head alone, backbone frozen, on the scoring examples);
the warmed head is kept as the starting point of fine-tuning unless the caller restores it
(``task_head_restorer``). Causal LMs have no separate head: their loss is next-token cross-entropy
of the text itself and no warm-up runs.

The same backward also gives ``score="gradient"`` (``TaskGradients``): with the projections'
weights requiring grad, the L1 norm of each head's slice of the gradient (``head_slice_gradients``:
its Q rows, its K/V group's rows, its O columns), the size of the first step that fine-tuning the
head would take (Sparse Matrix Tuning, He et al. 2024, picks blocks by it).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from ..adapters import DECODER_MASK, ROWS, AttentionLayer, attention_layers, get_adapter
from .batches import IGNORE_INDEX, scoring_stream


def task_head_names(model: nn.Module) -> list[str]:
    """The model's separate task head modules (``[]`` for causal LMs, whose LM head is the loss's)."""
    return get_adapter(model).default_modules_to_save(model)


def _mean_per_example(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[B]``: the mean of ``values`` ``[B, ...]`` over each example's ``valid`` entries (0 if none)."""
    values = torch.where(valid, values, torch.zeros_like(values)).reshape(values.shape[0], -1)
    count = valid.reshape(valid.shape[0], -1).sum(dim=1)
    return values.sum(dim=1) / count.clamp_min(1)


def per_example_loss(model: nn.Module, logits: torch.Tensor, labels: torch.Tensor, causal_lm: bool) -> torch.Tensor:
    """``[B]`` loss of each example, in float32 (float64 for a float64 model).

    - causal LM: next-token cross-entropy (logits at ``t`` predict ``labels`` at ``t + 1``), the
      mean over the example's targets (labels -100 are not targets);
    - classifier: as ``transformers`` defines it from ``config.problem_type`` (inferred as it does
      when unset): regression (MSE), single-label (cross-entropy; token classification: mean over the
      tokens not labelled -100) or multi-label (binary cross-entropy, mean over the labels).
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)
    logits = logits.to(dtype)
    if causal_lm:
        logits, labels = logits[:, :-1], labels[:, 1:]
    num_labels = logits.shape[-1]
    problem = getattr(getattr(model, "config", None), "problem_type", None)
    if causal_lm:
        problem = "single_label_classification"
    elif problem is None:
        if num_labels == 1:
            problem = "regression"
        elif labels.dtype in (torch.long, torch.int):
            problem = "single_label_classification"
        else:
            problem = "multi_label_classification"
    if problem == "single_label_classification":
        labels = labels.long()
        losses = F.cross_entropy(logits.reshape(-1, num_labels), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                                 reduction="none").view(labels.shape)
        return _mean_per_example(losses, labels != IGNORE_INDEX)
    target = labels.to(dtype)
    if problem == "regression":
        prediction = logits.squeeze(-1) if num_labels == 1 else logits
        losses = F.mse_loss(prediction, target.view(prediction.shape), reduction="none")
    else:
        losses = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return _mean_per_example(losses, torch.ones_like(losses, dtype=torch.bool))


class HeadGates:
    """Per-example gates ``xi[b, h] = 1`` on every layer's head outputs; one leaf tensor per layer,
    made at the layer's first forward (on its device, in its dtype) and shared by its later runs in
    the same forward (ALBERT's shared layers: the gate scales the head at every depth)."""

    def __init__(self, num_layers: int, num_heads: int) -> None:
        self.num_heads = num_heads
        self.leaves: list[torch.Tensor | None] = [None] * num_layers

    def apply(self, layer: int, context: torch.Tensor) -> torch.Tensor:
        """``context`` ``[B, T, H * d]`` with head ``h`` of example ``b`` multiplied by ``xi[b, h]``."""
        batch, tokens, width = context.shape
        gate = self.leaves[layer]
        if gate is None:
            gate = torch.ones(batch, self.num_heads, dtype=context.dtype, device=context.device, requires_grad=True)
            self.leaves[layer] = gate
        heads = context.view(batch, tokens, self.num_heads, width // self.num_heads)
        return (heads * gate[:, None, :, None]).view(batch, tokens, width)

    def take_leaves(self) -> list[torch.Tensor]:
        """The gates of the last forward (every layer must have run since the last call)."""
        missing = [i for i, leaf in enumerate(self.leaves) if leaf is None]
        if missing:
            raise RuntimeError(f"attention layers {missing} did not run in the forward pass")
        leaves, self.leaves = self.leaves, [None] * len(self.leaves)
        return leaves

    @staticmethod
    def stack(leaves: list[torch.Tensor], grads: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """``[L, B, H]`` float64 gradients of ``leaves`` (a gate the loss does not reach: 0)."""
        return torch.stack([torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, grads)]).to(torch.float64)

    def gradients(self, loss: torch.Tensor) -> torch.Tensor:
        """``[L, B, H]`` float64 ``d loss / d xi``."""
        leaves = self.take_leaves()
        return self.stack(leaves, torch.autograd.grad(loss, leaves, allow_unused=True))


class TaskGradients:
    """The task-aware statistics of one scoring batch, from one backward of its summed loss: the
    gate gradients of ``HeadGates`` (``importance``) and the L1 norm of each head's slice gradient
    (``gradient``, ``head_slice_gradients``)."""

    def __init__(self, model: nn.Module, layers: list[AttentionLayer], importance: bool, gradient: bool) -> None:
        self.layers = layers
        self.gates = HeadGates(len(layers), layers[0].num_heads) if importance else None
        self.modules = dict(model.named_modules())
        self.trainable = projection_names(layers) if gradient else []  # modules whose weights need grad

    def apply(self, layer: int, context: torch.Tensor) -> torch.Tensor | None:
        return None if self.gates is None else self.gates.apply(layer, context)

    def backward(self, loss: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``([L, B, H] gate gradients or None, [L, H] head slice gradient L1 norms or None)``."""
        leaves = self.gates.take_leaves() if self.gates is not None else []
        params = [(name, self.modules[name].weight, self.modules[name].bias) for name in self.trainable]
        tensors = [t for _, weight, bias in params for t in (weight, bias) if t is not None]
        grads = list(torch.autograd.grad(loss, [*leaves, *tensors], allow_unused=True))
        gate_grads = HeadGates.stack(leaves, grads[:len(leaves)]) if self.gates is not None else None
        if not params:
            return gate_grads, None
        rest = iter(grads[len(leaves):])
        by_module = {}
        for name, weight, bias in params:
            weight_grad = next(rest)
            bias_grad = next(rest) if bias is not None else None
            by_module[name] = (torch.zeros_like(weight) if weight_grad is None else weight_grad, bias_grad)
        return gate_grads, head_slice_gradients(self.layers, self.modules, by_module)


def projection_names(layers: list[AttentionLayer]) -> list[str]:
    """The Q/K/V (or fused QKV), O and extra per-head projection modules of every layer, each once."""
    names = [n for layer in layers for n in layer.projections().values()]
    return list(dict.fromkeys(names))


def head_slice_gradients(layers: list[AttentionLayer], modules: Mapping[str, nn.Module],
                         grads: Mapping[str, tuple[torch.Tensor, torch.Tensor | None]]) -> torch.Tensor:
    """``[L, H]`` float64: for every query head, the L1 norm of ``grads`` over the slices that
    ``patch`` would train for it (its Q rows, its K/V group's rows, its O columns; biases of the
    sliced rows included). ``grads`` maps projection names to ``(weight grad, bias grad or None)``."""
    first = next(iter(grads.values()))[0]
    out = torch.zeros(len(layers), layers[0].num_heads, dtype=torch.float64, device=first.device)
    for i, layer in enumerate(layers):
        block_sums: dict[tuple[str, str], torch.Tensor] = {}
        for head in range(layer.num_heads):
            for spec in layer.slices([head]):
                key = (spec.module_name, spec.sliced)
                if key not in block_sums:
                    block_sums[key] = _block_l1(modules[spec.module_name], *grads[spec.module_name], spec.sliced,
                                                spec.block_size)
                out[i, head] += block_sums[key][[b // spec.block_size for b in spec.blocks]].sum()
    return out


def _block_l1(module: nn.Module, weight_grad: torch.Tensor, bias_grad: torch.Tensor | None, sliced: str,
              block: int) -> torch.Tensor:
    """L1 norm of a projection's gradient per block of ``block`` output rows (``ROWS``, bias
    included) or input columns."""
    grad = (weight_grad if isinstance(module, nn.Linear) else weight_grad.t()).to(torch.float64).abs()  # [out, in]
    if sliced == ROWS:
        sums = grad.view(-1, block, grad.shape[1]).sum(dim=(1, 2))
        return sums if bias_grad is None else sums + bias_grad.to(torch.float64).abs().view(-1, block).sum(dim=1)
    return grad.view(grad.shape[0], -1, block).sum(dim=(0, 2))


@contextmanager
def only_trainable(model: nn.Module, names: list[str] = ()):
    """Inside: only the modules ``names`` (none: nothing) require grad; every flag is restored after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    modules = dict(model.named_modules())
    try:
        for param, _ in flags:
            param.requires_grad_(False)
        for name in names:
            modules[name].requires_grad_(True)
        yield
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)


def logits_of(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's output logits, or a clear error for a model without a task or LM head."""
    logits = getattr(model(**inputs), "logits", None)
    if logits is None:
        raise ValueError(
            f"score='importance' needs a model whose output has logits (a task head or an LM head); "
            f"{type(model).__name__} has none"
        )
    return logits


def refuse_encoder_decoders(model: nn.Module, layers: list[AttentionLayer]) -> None:
    """Task scores take one loss over one token stream; an encoder-decoder's decoder layers read
    another (``DECODER_MASK``): refused, with what to use instead."""
    if any(layer.mask == DECODER_MASK for layer in layers):
        raise ValueError(f"importance and gradient scores are not implemented for encoder-decoder models "
                         f"({type(model).__name__}); score them with score='pagerank' (statistics only) or select "
                         "score='random'")


def head_gate_gradients(model: nn.Module, batch: Mapping) -> torch.Tensor:
    """``[B, L, H]`` signed ``dL(x_b)/d xi[b, h]`` of one batch (labels as ``batch_labels`` takes them),
    computed as the scoring pass computes them. For analysis and tests; the model runs as it is."""

    layers = attention_layers(model)
    refuse_encoder_decoders(model, layers)
    causal_lm = not task_head_names(model)
    device = next(model.parameters()).device
    inputs, labels = next(scoring_stream([batch], device, 1 << 62, get_adapter(model).input_key, True, causal_lm))
    gates = HeadGates(len(layers), layers[0].num_heads)
    with gated(model, layers, gates.apply), only_trainable(model), torch.enable_grad():
        loss = per_example_loss(model, logits_of(model, inputs), labels, causal_lm).sum()
        return gates.gradients(loss).transpose(0, 1)


@contextmanager
def gated(model: nn.Module, layers, transform: Callable[[int, torch.Tensor], torch.Tensor | None]):
    """Inside: each layer's output projection sees ``transform(layer, context)`` (``None``: unchanged)."""
    modules = dict(model.named_modules())

    def hook_for(layer: int):
        def hook(_module, args):
            out = transform(layer, args[0])
            return None if out is None else (out,) + tuple(args[1:])
        return hook

    handles = [modules[layer.o].register_forward_pre_hook(hook_for(i)) for i, layer in enumerate(layers)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _backbone(model: nn.Module) -> nn.Module | None:
    base = getattr(model, "base_model", model)
    return None if base is model else base


def _detached(output) -> ModelOutput | None:
    """The tensors of a backbone's output, detached (caches, hidden-state tuples dropped), or
    ``None`` when the output is not a ``ModelOutput`` (then the warm-up runs the whole model)."""
    if not isinstance(output, ModelOutput):
        return None
    return type(output)(**{k: v.detach() for k, v in output.items() if torch.is_tensor(v)})


@contextmanager
def _replaying(module: nn.Module | None, output: ModelOutput | None):
    """Inside: ``module`` does not run; its forward returns ``output`` (no-op when either is None)."""
    if module is None or output is None:
        yield
        return
    saved = module.__dict__.get("forward")  # an instance-level forward (e.g. accelerate's) is kept
    module.forward = lambda *args, **kwargs: output
    try:
        yield
    finally:
        if saved is None:
            del module.forward
        else:
            module.forward = saved


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def task_head_restorer(model: nn.Module) -> Callable[[], None]:
    """A function that puts the task head's current parameters and buffers back (a copy of the head
    only: it is small beside the backbone)."""
    modules = dict(model.named_modules())
    saved = {name: {k: v.detach().clone() for k, v in modules[name].state_dict().items()}
             for name in task_head_names(model)}

    def restore() -> None:
        for name, state in saved.items():
            modules[name].load_state_dict(state)

    return restore


def warm_up_task_head(model: nn.Module, batches: list[tuple[dict, torch.Tensor]], steps: int, lr: float) -> None:
    """Train the task head alone (backbone frozen, model as it is, e.g. eval mode) for ``steps``
    AdamW steps, cycling over ``batches`` (``(inputs, labels)`` on the model's device).

    The backbone runs once per batch: its outputs are cached and replayed, so each step costs only
    the task head. Under ``torch.distributed`` every rank starts from rank 0's head and averages the
    head's gradients each step (data-parallel), so all ranks keep the same head. Nothing is restored:
    the warmed head is the starting point of fine-tuning."""
    names = task_head_names(model)
    if steps == 0 or not names or not batches:
        return
    backbone = _backbone(model)
    cache: list[ModelOutput | None] = []
    if backbone is not None:
        handle = backbone.register_forward_hook(lambda _m, _args, output: cache.append(_detached(output)))
        try:
            with torch.no_grad():
                for inputs, _ in batches:
                    model(**inputs)
        finally:
            handle.remove()
    params = [p for name in names for p in dict(model.named_modules())[name].parameters()]
    if _distributed():
        for param in params:
            dist.broadcast(param.data, src=0)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    with only_trainable(model, names), torch.enable_grad():
        for step in range(steps):
            inputs, labels = batches[step % len(batches)]
            with _replaying(backbone, cache[step % len(batches)] if cache else None):
                logits = logits_of(model, inputs)
            loss = per_example_loss(model, logits, labels, causal_lm=False).mean()
            optimizer.zero_grad(set_to_none=False)
            loss.backward()
            if _distributed():
                for param in params:
                    dist.all_reduce(param.grad)
                    param.grad /= dist.get_world_size()
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
