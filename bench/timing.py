"""Milliseconds of whole training steps, as the benchmarks time them."""
from __future__ import annotations

import time
from collections.abc import Callable

import torch


def step_times(step: Callable[[], object], count: int, device: torch.device,
               clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Milliseconds of each of ``count`` calls of ``step``: on a GPU, between CUDA events recorded
    after each call (one sync, after the last); elsewhere by ``clock`` (wall time by default)."""
    if device.type != "cuda":
        times = []
        for _ in range(count):
            start = clock()
            step()
            times.append((clock() - start) * 1e3)
        return times
    events = [torch.cuda.Event(enable_timing=True) for _ in range(count + 1)]
    events[0].record()
    for index in range(count):
        step()
        events[index + 1].record()
    torch.cuda.synchronize()
    return [a.elapsed_time(b) for a, b in zip(events, events[1:])]
