"""``hifi_fast.swap``: one base model in memory, many HiFi checkpoints, instant task switching.

A HiFi task differs from its base model only in a few heads' Q/K/V/O slices and the task head.
``swap(model, "run_b/")`` writes task B's slices (and task head) into the plain model's own weights
in place and puts back the base values of the slices the previous task had overwritten. The model
stays an ordinary, unpatched ``transformers`` model: inference costs one base forward, no extra
GEMM, no reload. ``swap(model, None)`` returns to the base model.

What is kept on the model, as ``model.hifi_swap_state`` (:class:`SwapState`):

- the base weights' fingerprint, hashed once, at the first swap (when the model is still at its
  base values): a checkpoint of another base model is refused without hashing every weight again;
- per task (the current one, and every task read with ``cache=True``): its verified values, already
  in the layout, dtype and device of the weights they go to, and the base values of exactly the
  slices it overwrites (captured the first time it is applied). A task thus costs twice its
  slices' size (the task head included) in memory, and swapping back to it reads nothing from disk;
- the version counter and storage of every parameter after the last swap, so that a weight changed
  outside ``swap`` (which would make the kept base values wrong) is refused rather than mixed up
  (best effort: writes through ``.data`` and parameters replaced by assignment are not seen).

Every slice is written with one ``index_copy_`` per projection tensor on a head-block view of it
(``[blocks, block_size, d_in]`` for Q/K/V rows and their bias, ``[d_out, blocks, block_size]`` for
O columns, the same on the transposed layout of GPT-2's ``Conv1D``; GQA K/V take the key/value
groups the selected query heads read), never a loop over heads.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn

from ..adapters import ROWS, slice_dim
from ..heads import HeadSelection
from ..tuning.patching import is_patched, plan_slices, weights_fingerprint
from .checkpoint import CONFIG_NAME, WEIGHTS_NAME, read_checkpoint, tensor_names

SWAP_ATTR = "hifi_swap_state"


class SwapStateError(RuntimeError):
    """The model's weights changed outside ``swap`` since the last swap: its kept base values are stale."""


@dataclass
class _Write:
    """One tensor a task writes: a head-block slice of a projection's weight or bias (``index`` set:
    blocks along ``dim`` of ``target``, the parameter viewed as ``[..., blocks, block_size, ...]``),
    or a whole task-head tensor (``index`` None). ``target`` is a detached view of ``param``, made
    once (``swap`` refuses a model whose parameters were replaced in storage since)."""

    param: nn.Parameter
    target: torch.Tensor
    values: torch.Tensor
    dim: int = 0
    index: torch.Tensor | None = None
    base: torch.Tensor | None = None

    def put(self, values: torch.Tensor, tensor: torch.Tensor | None = None) -> None:
        """Write ``values`` into the parameter (or into ``tensor``, a copy of it)."""
        target = self.target if tensor is None else tensor.view(self.target.shape)
        if self.index is None:
            target.copy_(values)
        else:
            target.index_copy_(self.dim, self.index, values)

    def take(self) -> torch.Tensor:
        """The parameter's current values where ``put`` writes."""
        if self.index is None:
            return self.target.clone()
        return self.target.index_select(self.dim, self.index)


@dataclass
class SwapTask:
    """A checkpoint read, verified and laid out for one model; ``writes`` are applied in order
    (task-head tensors first, then slices, as ``load`` + ``unpatch`` would) and undone in reverse."""

    path: str
    signature: tuple
    selection: HeadSelection
    checked_name: bool
    writes: list[_Write]

    @property
    def value_bytes(self) -> int:
        """Bytes of the task's own values kept in memory."""
        return sum(w.values.nbytes for w in self.writes)

    @property
    def base_bytes(self) -> int:
        """Bytes of the base values kept to undo the task (0 until it was first applied)."""
        return sum(w.base.nbytes for w in self.writes if w.base is not None)

    def apply(self) -> None:
        """Write the task into the model, which must be at its base values."""
        for write in self.writes:
            if write.base is None:
                write.base = write.take()
            write.put(write.values)

    def undo(self) -> None:
        """Put back the base values of everything ``apply`` wrote."""
        for write in reversed(self.writes):
            write.put(write.base)


@dataclass
class SwapState:
    """What ``swap`` keeps on a model (``model.hifi_swap_state``)."""

    params: list[tuple[str, nn.Parameter]]
    fingerprints: dict[tuple[frozenset[str], int], str] = field(default_factory=dict)
    tasks: dict[str, SwapTask] = field(default_factory=dict)
    current: SwapTask | None = None
    versions: list[tuple[int, int]] = field(default_factory=list, repr=False)

    @property
    def current_path(self) -> str | None:
        """The checkpoint the model holds now (``None``: the base model)."""
        return None if self.current is None else self.current.path

    def stored_bytes(self) -> int:
        """Bytes kept for all tasks in memory: their values and the base values they overwrite."""
        tasks = {id(t): t for t in [*self.tasks.values(), self.current] if t is not None}
        return sum(t.value_bytes + t.base_bytes for t in tasks.values())

    def snapshot(self) -> list[tuple[int, int]]:
        return [(p._version, p.data_ptr()) for _, p in self.params]


def swap(
    model: nn.Module,
    checkpoint: str | os.PathLike | None,
    *,
    check_name: bool = True,
    cache: bool = True,
) -> nn.Module:
    """Switch the plain ``model`` to the HiFi task saved in ``checkpoint``, in place; ``None``: back
    to the base model.

    The checkpoint's head slices and task head are written into the model's ordinary weights, and
    the base values of whatever the previous task overwrote (and this one does not) are restored,
    so the result equals ``hifi_fast.unpatch(hifi_fast.load(fresh_base_model, checkpoint))`` bit
    for bit, and the model stays an unpatched ``transformers`` model (no inference cost).

    Args:
        model: a plain (not patched) model of a supported family, at its base values on the first
            swap; afterwards changed only through ``swap``.
        checkpoint: a directory written by ``hifi_fast.save``, or ``None`` for the base model.
        check_name: also require the checkpoint's ``base_model_name_or_path`` to be the model's.
        cache: keep the verified checkpoint in memory (``model.hifi_swap_state.tasks``), so that
            swapping back to it reads nothing; it is read again if its files changed on disk.
            ``False``: read it from disk, and keep it only while it is the current task.

    Returns:
        ``model``.

    Raises:
        ValueError: the model is patched for training (``hifi_fast.is_patched``).
        SwapStateError: a weight changed outside ``swap`` since the last swap.
        FileNotFoundError: no checkpoint in ``checkpoint``.
        CheckpointMismatchError: the checkpoint is damaged, of another base model (architecture,
            sizes, dtype, name, weights fingerprint) or its task head does not fit the model's.
        In every case the model is left exactly as it was.
    """
    if checkpoint is not None and not isinstance(checkpoint, (str, os.PathLike)):
        raise TypeError(
            f"swap: checkpoint must be a directory written by hifi_fast.save (str or os.PathLike) or None "
            f"for the base model, got {type(checkpoint).__name__}"
        )
    if is_patched(model):
        raise ValueError(
            "swap: the model is patched for training by hifi_fast (hifi_fast.patch/load); swap works on a plain "
            "model: call hifi_fast.unpatch(model) first, or swap on a separate copy of the base model"
        )
    state = getattr(model, SWAP_ATTR, None)
    if state is not None:
        _check_untouched(state)
    elif checkpoint is None:
        return model  # never swapped: already the base model
    else:
        state = SwapState(params=list(model.named_parameters()))
    task = None if checkpoint is None else _read_task(model, state, checkpoint, check_name, cache)
    if task is not state.current:
        if state.current is not None:
            state.current.undo()
        if task is not None:
            task.apply()
        state.current = task
    if task is not None:
        if cache:
            state.tasks[task.path] = task
        else:
            state.tasks.pop(task.path, None)
    state.versions = state.snapshot()
    setattr(model, SWAP_ATTR, state)
    return model


def _check_untouched(state: SwapState) -> None:
    if state.snapshot() == state.versions:
        return
    changed = [name for (name, _), now, then in zip(state.params, state.snapshot(), state.versions) if now != then]
    shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
    raise SwapStateError(
        f"swap: {shown} changed outside hifi_fast.swap since the last swap (an in-place edit, optimizer step, "
        "load_state_dict, .to(), patch/unpatch, ...), so the base values kept to restore the model are no longer "
        "valid. Load the base model again, or `del model.hifi_swap_state` to take the model as it is now as the "
        "new base model."
    )


def _signature(path: str) -> tuple | None:
    """Identity of the checkpoint's two files on disk (``save`` replaces both by renaming)."""
    try:
        stats = [os.stat(os.path.join(path, name)) for name in (CONFIG_NAME, WEIGHTS_NAME)]
    except OSError:
        return None
    return tuple((s.st_ino, s.st_size, s.st_mtime_ns) for s in stats)


def _read_task(model: nn.Module, state: SwapState, checkpoint: str | os.PathLike, check_name: bool, cache: bool) -> SwapTask:
    """The task in ``checkpoint``: from the cache if its files are unchanged, else read and verified
    (nothing on the model changes either way)."""
    path = os.path.abspath(os.fspath(checkpoint))
    signature = _signature(path)
    cached = state.tasks.get(path) if cache else None
    if cached is not None and signature is not None and cached.signature == signature and (cached.checked_name or not check_name):
        return cached

    def base_fingerprint(modules_to_save: list[str], version: int) -> str:
        key = (frozenset(modules_to_save), version)
        if key not in state.fingerprints:
            base = model if state.current is None else _BaseView(model, state.current)
            state.fingerprints[key] = weights_fingerprint(base, modules_to_save, version)
        return state.fingerprints[key]

    config, selection, tensors = read_checkpoint(model, path, check_name, base_fingerprint)
    return SwapTask(path, signature, selection, check_name, _plan_writes(model, selection, config["modules_to_save"], tensors))


def _plan_writes(model: nn.Module, selection: HeadSelection, modules_to_save: list[str], tensors: dict[str, torch.Tensor]) -> list[_Write]:
    """The checkpoint's tensors as writes into ``model``: task-head tensors whole, slices as head
    blocks in the weight's own storage layout, dtype and device."""
    modules, names = dict(model.named_modules()), tensor_names(model)
    writes = []
    for head in modules_to_save:
        for param in modules[head].parameters():
            writes.append(_Write(param, param.detach(), tensors[names[id(param)]].to(param.device)))
    for spec in plan_slices(model, selection):
        module, size = modules[spec.module_name], spec.block_size
        if any(b % size for b in spec.blocks):
            raise ValueError(f"swap: head blocks {spec.blocks} of {spec.module_name} are not multiples of {size}")
        index = torch.tensor([b // size for b in spec.blocks], device=module.weight.device)
        transposed = not isinstance(module, nn.Linear)  # GPT-2 Conv1D stores [d_in, d_out]
        dim = slice_dim(spec.sliced) ^ transposed
        values = tensors[f"{spec.module_name}.hifi_weight"]
        writes.append(_block_write(module, "weight", values.t() if transposed else values, dim, size, index))
        if spec.sliced == ROWS and module.bias is not None:
            writes.append(_block_write(module, "bias", tensors[f"{spec.module_name}.hifi_bias"], 0, size, index))
    return writes


def _block_write(module: nn.Module, attr: str, values: torch.Tensor, dim: int, size: int, index: torch.Tensor) -> _Write:
    """A write of ``values`` (compact, ``len(index) * size`` features along ``dim``) into the head
    blocks ``index`` of ``module.<attr>``."""
    param = getattr(module, attr)
    blocks = values.unflatten(dim, (-1, size)).to(device=param.device, dtype=param.dtype).contiguous()
    view = param.shape[:dim] + (param.shape[dim] // size, size) + param.shape[dim + 1:]
    return _Write(param, param.detach().view(view), blocks, dim, index)


class _BaseView:
    """The model's parameters with a task's writes undone on copies, i.e. the base model's, for
    ``weights_fingerprint`` (which reads only ``named_parameters``); the model is not touched."""

    def __init__(self, model: nn.Module, task: SwapTask) -> None:
        self.model, self.task = model, task

    def named_parameters(self):
        undo: dict[int, list[_Write]] = {}
        for write in reversed(self.task.writes):
            undo.setdefault(id(write.param), []).append(write)
        for name, param in self.model.named_parameters():
            writes = undo.get(id(param))
            if writes:
                param = param.detach().clone()
                for write in writes:
                    write.put(write.base, param)
            yield name, param
