"""Projection modules with trainable head slices.

``patch`` switches a projection's class to ``HiFiLinear``/``HiFiConv1D`` in place (the base weight
object stays the same) and attaches the compact slices: ``hifi_weight`` (and ``hifi_bias``). The
base weight stays the one tensor the forward GEMM reads; whenever the slices may have changed since
the last write (any optimizer step, fused ones included, or an in-place edit), their values are
copied into it first, so no call is needed after ``optimizer.step()``. Under FSDP, whose forward
sees an all-gathered copy of the weight (writes into it would be lost), the slices are merged into
a temporary copy instead.

The module's ``state_dict`` is the plain model's: the slices are written into the base weight first
and their own keys are left out, so ``save_pretrained``/``Trainer.save_model`` write a plain
checkpoint; ``load_state_dict`` refreshes the slices from the loaded base weight.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from transformers.pytorch_utils import Conv1D

try:  # FSDP2 shards parameters as DTensors
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # torch built without distributed support
    DTensor, distribute_tensor = (), None

from .adapters import ProjectionSlice, attention_layers
from .ops import feature_index
from .sparse_head_linear import COLS, ROWS, slice_dim, sparse_head_linear

# Fused optimizers update parameters without bumping their version counters, so every optimizer
# step (of any torch optimizer) is counted here and makes the slices count as changed.
_optimizer_steps = 0


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


register_optimizer_step_post_hook(_count_optimizer_step)
SLICE_PARAMS = ("hifi_weight", "hifi_bias")


def _is_slice_key(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in SLICE_PARAMS


class HeadSliceMixin:
    """The parts shared by the Linear and Conv1D variants; ``weight_2d`` is ``[d_out, d_in]``."""

    hifi_weight: nn.Parameter
    hifi_bias: nn.Parameter | None
    hifi_blocks: torch.Tensor
    hifi_index: torch.Tensor

    def as_2d(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` (this module's layout) as ``[d_out, d_in]``."""
        raise NotImplementedError

    def weight_2d(self) -> torch.Tensor:
        return self.as_2d(self.weight)

    def attach_slices(self, spec: ProjectionSlice, master_dtype: torch.dtype | None = None) -> None:
        """Create the compact trainable slices from the current base weight, in ``master_dtype``
        (default: the weight's own)."""
        weight = self.weight_2d()
        blocks = torch.tensor(spec.blocks, dtype=torch.long, device=weight.device)
        index = feature_index(blocks, spec.block_size)
        self.hifi_sliced, self.hifi_block_size = spec.sliced, spec.block_size
        self.register_buffer("hifi_blocks", blocks, persistent=False)
        self.register_buffer("hifi_index", index, persistent=False)
        dim = slice_dim(spec.sliced)
        dtype = master_dtype or weight.dtype
        self.hifi_weight = nn.Parameter(weight.detach().index_select(dim, index).to(dtype, copy=True))
        bias = self.bias if spec.sliced == ROWS else None
        self.hifi_bias = None if bias is None else nn.Parameter(bias.detach()[index].to(dtype, copy=True))
        self.hifi_synced = self.slice_state()
        self.hifi_hooks = [
            self.register_state_dict_pre_hook(lambda module, prefix, keep_vars: module.sync_for_state_dict()),
            self.register_state_dict_post_hook(_drop_slice_keys),
            self.register_load_state_dict_pre_hook(lambda module, *args: module.sync_slices()),
            self.register_load_state_dict_post_hook(_refresh_after_load),
        ]

    def slice_state(self) -> tuple[int, ...]:
        """Changes whenever the slices may have changed: an optimizer step or an in-place edit."""
        return (_optimizer_steps,) + tuple(p._version for p in (self.hifi_weight, self.hifi_bias) if p is not None)

    @torch.no_grad()
    def sync_slices(self) -> None:
        """Write the compact slices into the base weight if they may have changed since the last write."""
        # Compiled graphs cannot guard on version counters: there the copy (k·d_h rows, no FLOPs)
        # simply runs every forward.
        if not torch.compiler.is_compiling() and self.slice_state() == self.hifi_synced:
            return
        weight = whole_tensor(self.weight)
        slices = whole_tensor(self.hifi_weight).to(weight.dtype)
        self.as_2d(weight).index_copy_(slice_dim(self.hifi_sliced), self.hifi_index, slices)
        _assign(self.weight, weight)
        if self.hifi_bias is not None:
            bias = whole_tensor(self.bias)
            bias.index_copy_(0, self.hifi_index, whole_tensor(self.hifi_bias).to(bias.dtype))
            _assign(self.bias, bias)
        if not torch.compiler.is_compiling():
            self.hifi_synced = self.slice_state()

    def sync_for_state_dict(self) -> None:
        """Before ``state_dict``: the plain model's state holds the slices."""
        if getattr(self, "_is_fsdp_managed_module", False) and not isinstance(self.weight, DTensor):
            raise NotImplementedError(
                "state_dict of a hifi_fast-patched model under FSDP1 (FullyShardedDataParallel) is not "
                "supported: its parameters are views of flat shards there. Training under it works; to "
                "save, shard with FSDP2 (torch.distributed.fsdp.fully_shard), whose state dicts and "
                "hifi_fast.save are supported."
            )
        self.sync_slices()

    @torch.no_grad()
    def refresh_slices(self) -> None:
        """Read the slices back from the base weight (after it was loaded)."""
        dim = slice_dim(self.hifi_sliced)
        _assign(self.hifi_weight, self.as_2d(whole_tensor(self.weight)).index_select(dim, self.hifi_index))
        if self.hifi_bias is not None:
            _assign(self.hifi_bias, whole_tensor(self.bias)[self.hifi_index])
        self.hifi_synced = self.slice_state()

    def detach_slices(self) -> None:
        """Write the slices back and remove them; the module is its plain class again."""
        self.sync_slices()
        for hook in self.hifi_hooks:
            hook.remove()
        for name in SLICE_PARAMS + ("hifi_blocks", "hifi_index"):
            delattr(self, name)
        for name in ("hifi_sliced", "hifi_block_size", "hifi_synced", "hifi_hooks"):
            self.__dict__.pop(name, None)
        self.__class__ = PLAIN_CLASS[type(self)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        merge_index = None
        # FSDP (1 and 2) marks the modules it manages; their weight in the forward is an all-gathered
        # copy that is freed and gathered again (from the unchanged shards) for the backward.
        if getattr(self, "_is_fsdp_managed_module", False):
            merge_index = self.hifi_index
        else:
            self.sync_slices()
        return sparse_head_linear(
            x, self.weight_2d(), self.bias, self.hifi_weight, self.hifi_bias,
            self.hifi_blocks, self.hifi_block_size, self.hifi_sliced, merge_index,
        )

    def extra_repr(self) -> str:
        heads = [b // self.hifi_block_size for b in self.hifi_blocks.tolist()]
        return f"{super().extra_repr()}, trainable_{self.hifi_sliced}_blocks={heads}, block_size={self.hifi_block_size}"


class HiFiLinear(HeadSliceMixin, nn.Linear):
    """``nn.Linear`` whose only trainable parameters are head slices."""

    def as_2d(self, weight: torch.Tensor) -> torch.Tensor:
        return weight


class HiFiConv1D(HeadSliceMixin, Conv1D):
    """GPT-2 ``Conv1D`` (weight ``[d_in, d_out]``) whose only trainable parameters are head slices."""

    def as_2d(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.t()


def whole_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole value of an FSDP2 shard (gathered: every rank must call), else ``tensor`` itself."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _assign(target: torch.Tensor, value: torch.Tensor) -> None:
    """``target[...] = value``; for a shard, its own part of ``value``."""
    if target is value:
        return
    if isinstance(target, DTensor):
        target, value = target.to_local(), distribute_tensor(value, target.device_mesh, target.placements).to_local()
    target.copy_(value)


def _drop_slice_keys(module, state_dict, prefix, local_metadata) -> None:
    for name in SLICE_PARAMS:
        state_dict.pop(prefix + name, None)


def _refresh_after_load(module, incompatible_keys) -> None:
    module.refresh_slices()
    incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if not _is_slice_key(k)]


HIFI_CLASS = {nn.Linear: HiFiLinear, Conv1D: HiFiConv1D}
PLAIN_CLASS = {v: k for k, v in HIFI_CLASS.items()}


def convert(module: nn.Module, spec: ProjectionSlice, master_dtype: torch.dtype | None = None) -> None:
    """Turn a plain projection into its head-slice variant in place."""
    module.__class__ = HIFI_CLASS[type(module)]
    module.attach_slices(spec, master_dtype)


def slice_param_count(module: nn.Module, spec: ProjectionSlice) -> int:
    """Trainable parameters the slice ``spec`` of ``module`` has (bias entries included)."""
    weight = module.weight if isinstance(module, nn.Linear) else module.weight.t()
    width = len(spec.blocks) * spec.block_size
    if spec.sliced == COLS:
        return width * weight.shape[0]
    return width * weight.shape[1] + (width if module.bias is not None else 0)


def head_param_cost(model: nn.Module) -> int:
    """Trainable parameters one head costs at most (its own K/V group rows included)."""
    layer = attention_layers(model)[0]
    modules = dict(model.named_modules())
    return sum(slice_param_count(modules[s.module_name], s) for s in layer.slices([0]))
