"""``python -m bench.profile_step --device cpu|cuda``: where a training step's time goes, per method.

Profiles a few training steps of each method (``torch.profiler``) on the quick suite's model and
batch and writes ``bench/results/<device>/profile.md``: forward / backward / optimizer time per
method and each method's most expensive operators. It answers why a method is as fast as it is
(e.g. how close HiFi's step is to the frozen-backbone lower bound that no in-backbone method can beat).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from .run import METHODS, SUITES, device_name, label
from .setup_methods import build_model, make_batch, prepare

PHASES = ("forward", "backward", "optimizer")


def profile_method(method: str, options: dict, model_name: str, batch_size: int, seq_len: int,
                   device: torch.device, steps: int) -> tuple[dict[str, float], str]:
    """Milliseconds per step of each phase, and the top-operator table, for one method."""
    torch.manual_seed(0)
    model = build_model(model_name).to(device)
    batch = make_batch(model, batch_size, seq_len, 0, device)
    scoring = [{k: v for k, v in batch.items() if k != "labels"}] * 4
    model = prepare(model, method, lora_r=options.get("lora_r", 8), scoring_batches=scoring).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step(mark=lambda: None) -> list:
        """One training step; ``mark`` is called at the phase boundaries and its results returned."""
        optimizer.zero_grad(set_to_none=True)
        marks = [mark()]
        with record_function("forward"):
            loss = model(**batch).loss
        marks.append(mark())
        with record_function("backward"):
            loss.backward()
        marks.append(mark())
        with record_function("optimizer"):
            optimizer.step()
        marks.append(mark())
        return marks

    for _ in range(3):  # warm-up
        step()
    phases = _phase_times(step, device, steps)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_by, row_limit=12, max_name_column_width=48)
    return phases, table


def _phase_times(step, device: torch.device, steps: int) -> dict[str, float]:
    """Milliseconds per step of each phase, timed outside the profiler: CUDA events on the stream
    on a GPU (a CPU-side range would miss the backward's kernels, launched by autograd's own
    thread, and count launches rather than work), the wall clock on CPU."""
    if device.type == "cuda":
        def mark():
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        elapsed = lambda a, b: a.elapsed_time(b)  # noqa: E731
    else:
        mark, elapsed = time.perf_counter, lambda a, b: (b - a) * 1e3  # noqa: E731
    runs = [step(mark) for _ in range(steps)]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {phase: sum(elapsed(m[i], m[i + 1]) for m in runs) / steps for i, phase in enumerate(PHASES)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--model", default=None, help="default: the quick suite's model for the device")
    parser.add_argument("--out", type=Path, default=None, help="default: bench/results/<device>/profile.md")
    args = parser.parse_args(argv)
    model_name, batch_size, seq_len, _, _ = SUITES["quick"][args.device]
    model_name = args.model or model_name
    device = torch.device(args.device)
    out = args.out or Path(__file__).parent / "results" / device_name(args.device) / "profile.md"

    summary = ["| method | forward ms | backward ms | optimizer ms | step ms |", "|---|---|---|---|---|"]
    details = []
    for method, options in METHODS:
        name = label(method, options)
        phases, table = profile_method(method, options, model_name, batch_size, seq_len, device, args.steps)
        ms = [phases.get(p, 0.0) for p in PHASES]
        summary.append(f"| {name} | " + " | ".join(f"{v:.1f}" for v in ms) + f" | {sum(ms):.1f} |")
        details += [f"### {name}", "", "```", table.rstrip(), "```", ""]
        print(summary[-1], flush=True)
    header = [
        f"# Training-step profile: {model_name}, batch {batch_size} x {seq_len} tokens, {device_name(args.device)}",
        "",
        f"torch {torch.__version__}; phase times: mean of {args.steps} steps per method after 3 warm-up steps, "
        "timed outside the profiler (CUDA events on a GPU, the wall clock on CPU); operator tables: "
        f"{args.steps} more steps under the profiler.",
        "",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(header + summary + ["", "## Top operators by self time", ""] + details))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
