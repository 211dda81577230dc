"""Projection modules with trainable head slices.

``patch`` switches a projection's class to ``HiFiLinear``/``HiFiConv1D`` in place (the base weight
object stays the same) and attaches the slices ``hifi_weight`` (and ``hifi_bias``). The base weight
stays the one tensor the forward GEMM reads, and holds the slices' current values:

- **a view** where the selected heads' rows are one contiguous range of the weight (one head, or
  adjacent heads: often GQA's K/V): the optimizer, fused or not, updates the weight in place and
  nothing runs per step. The view is re-made whenever the weight is replaced (``.to()``,
  ``.half()``, copies, unpickling, ``load_state_dict(assign=True)``);
- **a compact copy** otherwise (several separate heads, the output projection's columns, GPT-2's
  transposed ``Conv1D``, fp32 ``master_dtype`` slices of a bf16 model): written into the weight
  right after every optimizer step (fused ones included), by one batched copy for all such modules
  the optimizer trains; an eager forward that finds a slice edited in place since (its version
  counter moved) writes it first. One compact parameter costs less per step than one view per head
  (each parameter is an autograd leaf and an optimizer tensor) and fused optimizers need contiguous
  parameters.

Under FSDP, whose forward sees an all-gathered copy of the weight (writes into it would be lost),
the slices are merged into a temporary copy instead.

The module's ``state_dict`` is the plain model's: the slices are written into the base weight first
and their own keys are left out, so ``save_pretrained``/``Trainer.save_model`` write a plain
checkpoint; ``load_state_dict`` refreshes the slices from the loaded base weight.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from transformers.pytorch_utils import Conv1D

try:  # FSDP2 shards parameters as DTensors
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # torch built without distributed support
    DTensor, distribute_tensor = (), None

from ..adapters import COLS, ROWS, ProjectionSlice, attention_layers, slice_dim
from ..backends import backend_name
from ..ops import feature_index
from . import native
from .sparse_head_linear import (SliceIndex, SlicePlan, apply_eagerly, eager_slice_grads, native_args, runs_of,
                                 sparse_head_linear)

# Compact slices are written into their weights right after every optimizer step (fused optimizers
# do not even bump the slices' version counters): once per step, in one pass, rather than checked and
# written in every forward. The forward still checks the version counters, which catch in-place
# edits made outside an optimizer step.
_compact_modules: weakref.WeakSet = weakref.WeakSet()
# Per optimizer, what its step writes: ``(param-groups key, modules (weak), targets, values)``, made
# once rather than gathered in every step; forgotten when a compact module is added, re-read
# (``_cache_call_args``), removed or garbage-collected. The modules are held weakly and the plan by a
# weak key, so neither the optimizer nor the plan keeps a model alive.
_write_plans: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_watched_modules: weakref.WeakSet = weakref.WeakSet()  # those whose collection forgets the plans


def _forget_write_plans(*_) -> None:
    _write_plans.clear()


def _groups_key(optimizer) -> tuple:
    return tuple((len(g["params"]), id(g["params"][0]), id(g["params"][-1])) if g["params"] else 0
                 for g in optimizer.param_groups)


def _write_plan(optimizer) -> tuple:
    """``(modules, targets, values)`` of the compact slices ``optimizer`` trains."""
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    modules = [m for m in _compact_modules if m.hifi_copies is not None and id(m.hifi_slices[0]) in trained]
    targets = [t for m in modules for t in m.hifi_copies[1]]
    values = [v for m in modules for v in m.hifi_copies[2]]
    return tuple(weakref.ref(m) for m in modules), targets, values


def _write_compact_slices(optimizer, args, kwargs) -> None:
    key = _groups_key(optimizer)
    plan = _write_plans.get(optimizer)
    if plan is None or plan[0] != key:
        plan = _write_plans[optimizer] = (key, *_write_plan(optimizer))
    modules = [ref() for ref in plan[1]]
    for module in modules:
        if module is None or module._parameters["weight"] is not module.hifi_copies[0]:
            if module is not None:
                module._cache_call_args()  # the weight was replaced (FSDP, assignment): read it again
            _forget_write_plans()
            return _write_compact_slices(optimizer, args, kwargs)
    if not modules:
        return
    with torch.no_grad():
        torch._foreach_copy_(plan[2], plan[3])
    for module in modules:
        module.hifi_synced = module.slice_state()


register_optimizer_step_post_hook(_write_compact_slices)
SLICE_PARAMS = ("hifi_weight", "hifi_bias")


def _is_slice_key(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in SLICE_PARAMS


class HeadSliceMixin:
    """The parts shared by the Linear and Conv1D variants; ``weight_2d`` is ``[d_out, d_in]``."""

    hifi_weight: nn.Parameter
    hifi_bias: nn.Parameter | None
    hifi_blocks: torch.Tensor
    hifi_index: torch.Tensor
    hifi_plan: SlicePlan
    # FSDP sets it on the modules it manages (instance attribute); a class default keeps the check cheap.
    _is_fsdp_managed_module = False

    def as_2d(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` (this module's layout) as ``[d_out, d_in]``."""
        raise NotImplementedError

    def weight_2d(self) -> torch.Tensor:
        return self.as_2d(self.weight)

    def attach_slices(self, spec: ProjectionSlice, master_dtype: torch.dtype | None = None) -> None:
        """Create the trainable slices from the current base weight: a view where they are one
        contiguous run of it in its own dtype, else a compact copy in ``master_dtype`` (default:
        the weight's)."""
        weight = self.weight_2d().detach()
        blocks = torch.tensor(spec.blocks, dtype=torch.long, device=weight.device)
        index = feature_index(blocks, spec.block_size)
        self.register_buffer("hifi_blocks", blocks, persistent=False)
        self.register_buffer("hifi_index", index, persistent=False)
        self.hifi_heads = tuple(b // spec.block_size for b in spec.blocks)
        dim, dtype = slice_dim(spec.sliced), master_dtype or weight.dtype
        runs = self.hifi_runs = runs_of(spec.blocks, spec.block_size)
        view = runs[0] if len(runs) == 1 and dtype == weight.dtype and weight.narrow(dim, *runs[0]).is_contiguous() else None
        with_bias = spec.sliced == ROWS and self.bias is not None
        self.hifi_plan = SlicePlan(spec.sliced, spec.block_size, with_bias, view)
        if view is not None:
            self.hifi_weight = nn.Parameter(weight.narrow(dim, *view))
            self.hifi_bias = nn.Parameter(self.bias.detach().narrow(0, *view)) if with_bias else None
        else:
            self.hifi_weight = nn.Parameter(weight.index_select(dim, index).to(dtype, copy=True))
            self.hifi_bias = nn.Parameter(self.bias.detach()[index].to(dtype, copy=True)) if with_bias else None
        self._cache_call_args()
        self.hifi_synced = self.slice_state()
        self.hifi_hooks = [
            self.register_state_dict_pre_hook(_sync_before_state_dict),
            self.register_state_dict_post_hook(_drop_slice_keys),
            self.register_load_state_dict_pre_hook(_sync_before_load),
            self.register_load_state_dict_post_hook(_refresh_after_load),
        ]

    def _cache_call_args(self) -> None:
        """The tensors the forward and the post-step write use, read once here rather than through
        ``nn.Module``'s ``__getattr__`` in every call; re-read whenever ``_apply`` or a load
        replaced them. ``hifi_copies``: for a compact slice on a weight of its own, the pairs
        ``(targets, values)`` of views that the write after each optimizer step copies, one per run
        of adjacent head blocks, and the weight they were taken from (``None``: views, or FSDP's
        shards, which merge instead; FSDP replaces the parameters, and the first forward under it
        drops what was read before, which would keep the unsharded tensors alive)."""
        self.hifi_slices = (self.hifi_weight,) if self.hifi_bias is None else (self.hifi_weight, self.hifi_bias)
        self.hifi_indices = SliceIndex(self.hifi_blocks, self.hifi_index, backend_name(self.hifi_index.device))
        self.hifi_grads = eager_slice_grads(self.hifi_plan, self.hifi_indices)
        self.hifi_native = native_args(self.hifi_plan, self.hifi_indices, self.hifi_slices)
        self.hifi_copies = None
        weight = self._parameters["weight"]
        if self.hifi_plan.view is None and not self._is_fsdp_managed_module and not isinstance(weight, DTensor):
            dim, offset, targets, values = slice_dim(self.hifi_plan.sliced), 0, [], []
            weight_2d = self.as_2d(weight.detach())
            for start, length in self.hifi_runs:
                targets.append(weight_2d.narrow(dim, start, length))
                values.append(self.hifi_weight.detach().narrow(dim, offset, length))
                if self.hifi_bias is not None:
                    targets.append(self.bias.detach().narrow(0, start, length))
                    values.append(self.hifi_bias.detach().narrow(0, offset, length))
                offset += length
            self.hifi_copies = (weight, targets, values)
            if self not in _watched_modules:  # once per module, however often it is patched
                weakref.finalize(self, _forget_write_plans)
                _watched_modules.add(self)
            _compact_modules.add(self)
        _forget_write_plans()

    @property
    def hifi_is_view(self) -> bool:
        """The slices are views of the weight (rather than compact copies written into it)."""
        return self.hifi_plan.view is not None and not self._is_fsdp_managed_module and not isinstance(self.weight, DTensor)

    def link_slices(self) -> None:
        """Make view slices views of the current weight again (after it was replaced or converted:
        the weight holds the values, converted, copied or loaded with the slices)."""
        if not self.hifi_is_view:
            return
        dim = slice_dim(self.hifi_plan.sliced)
        views = [(self.hifi_weight, self.weight_2d().detach().narrow(dim, *self.hifi_plan.view))]
        if self.hifi_bias is not None:
            views.append((self.hifi_bias, self.bias.detach().narrow(0, *self.hifi_plan.view)))
        for param, view in views:
            if param.data_ptr() != view.data_ptr() or param.dtype != view.dtype or param.shape != view.shape:
                param.data = view

    def _apply(self, fn, recurse=True):
        module = super()._apply(fn, recurse)
        if hasattr(self, "hifi_plan"):
            self._cache_call_args()
            self.link_slices()
        return module

    def __setstate__(self, state) -> None:
        super().__setstate__(state)  # copy.deepcopy and unpickling copy the weight and its views apart
        if "hifi_plan" in state:
            self._cache_call_args()
            self.link_slices()

    def slice_state(self) -> tuple[int, int]:
        """The slices' version counters: they change with any in-place edit (but a fused optimizer's)."""
        slices = self.hifi_slices
        return slices[0]._version, slices[-1]._version

    @torch.no_grad()
    def sync_slices(self) -> None:
        """Write compact slices into the base weight, FSDP2 shards included (before a state dict,
        a load, an unpatch; views need nothing: the weight is their storage)."""
        if self.hifi_is_view:
            return
        weight = whole_tensor(self.weight)
        slices = whole_tensor(self.hifi_weight).to(weight.dtype)
        self.as_2d(weight).index_copy_(slice_dim(self.hifi_plan.sliced), self.hifi_index, slices)
        _assign(self.weight, weight)
        if self.hifi_bias is not None:
            bias = whole_tensor(self.bias)
            bias.index_copy_(0, self.hifi_index, whole_tensor(self.hifi_bias).to(bias.dtype))
            _assign(self.bias, bias)
        if not torch.compiler.is_compiling():
            self.hifi_synced = self.slice_state()

    def sync_for_state_dict(self) -> None:
        """Before ``state_dict``: the plain model's state holds the slices."""
        if self._is_fsdp_managed_module and not isinstance(self.weight, DTensor):
            raise NotImplementedError(
                "state_dict of a hifi_fast-patched model under FSDP1 (FullyShardedDataParallel) is not "
                "supported: its parameters are views of flat shards there. Training under it works; to "
                "save, shard with FSDP2 (torch.distributed.fsdp.fully_shard), whose state dicts and "
                "hifi_fast.save are supported."
            )
        self.sync_slices()

    @torch.no_grad()
    def refresh_slices(self) -> None:
        """Read the slices back from the base weight (after it was loaded; views are re-made if the
        weight was replaced)."""
        self._cache_call_args()
        if self.hifi_is_view:
            self.link_slices()
            return
        dim = slice_dim(self.hifi_plan.sliced)
        _assign(self.hifi_weight, self.as_2d(whole_tensor(self.weight)).index_select(dim, self.hifi_index))
        if self.hifi_bias is not None:
            _assign(self.hifi_bias, whole_tensor(self.bias)[self.hifi_index])
        self.hifi_synced = self.slice_state()

    def detach_slices(self) -> None:
        """Write the slices back and remove them; the module is its plain class again."""
        self.sync_slices()
        self.remove_slices()

    def remove_slices(self) -> None:
        """Remove whatever ``attach_slices`` made, all of it or (it failed) some, without writing
        anything back; the module is its plain class again."""
        _compact_modules.discard(self)
        _forget_write_plans()
        for hook in self.__dict__.get("hifi_hooks", ()):
            hook.remove()
        for name in SLICE_PARAMS + ("hifi_blocks", "hifi_index"):
            self._parameters.pop(name, None)
            self._buffers.pop(name, None)
            self._non_persistent_buffers_set.discard(name)
        for name in SLICE_PARAMS + ("hifi_plan", "hifi_heads", "hifi_runs", "hifi_slices", "hifi_indices", "hifi_grads", "hifi_native", "hifi_copies",
                     "hifi_synced", "hifi_hooks"):
            self.__dict__.pop(name, None)
        self.__class__ = PLAIN_CLASS[type(self)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._is_fsdp_managed_module:  # FSDP swaps the parameter objects: read them by name
            if self.hifi_copies is not None:
                self._cache_call_args()
            slices = (self.hifi_weight,) if self.hifi_bias is None else (self.hifi_weight, self.hifi_bias)
            return sparse_head_linear(x, self.weight_2d(), self.bias, slices, self.hifi_plan,
                                      SliceIndex(self.hifi_blocks, self.hifi_index, backend_name(x.device)), merge=True)
        # The hot path: dict reads only (no nn.Module.__getattr__), one check, one autograd node
        # whose backward was fixed at patch time: the C++ one where it runs, else the Python one.
        params, slices = self._parameters, self.hifi_slices
        weight, bias = self.as_2d(params["weight"]), params["bias"]
        if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
            # Compiled graphs neither check (they cannot guard on version counters) nor write: a
            # write into the weight inside a graph is an input mutation, which AOTAutograd turns into
            # copies of the whole weight. The write after each optimizer step is all they need.
            return sparse_head_linear(x, weight, bias, slices, self.hifi_plan, self.hifi_indices)
        if self.hifi_plan.view is None and self.hifi_synced != self.slice_state():
            self.sync_slices()
        if not torch.is_grad_enabled():
            return F.linear(x, weight, bias)
        if self.hifi_native is not None:
            return native.extension().head_slice_linear(*self.hifi_native, x, weight, bias)
        return apply_eagerly(x, weight, bias, self.hifi_grads, *slices)

    def extra_repr(self) -> str:
        kind = "compact copy" if self.hifi_plan.view is None else "view"
        return (f"{super().extra_repr()}, trainable_{self.hifi_plan.sliced}_blocks={list(self.hifi_heads)}, "
                f"block_size={self.hifi_plan.block_size}, slices={kind}")


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


# The hooks are module-level functions, not lambdas: a patched model pickles (``torch.save(model)``).
def _sync_before_state_dict(module, prefix, keep_vars) -> None:
    module.sync_for_state_dict()


def _sync_before_load(module, *args) -> None:
    module.sync_slices()


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
    try:
        module.attach_slices(spec, master_dtype)
    except BaseException:
        module.remove_slices()
        raise


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
