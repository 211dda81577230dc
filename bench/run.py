"""``python -m bench.run --suite quick|full --device cpu|cuda``: HiFi vs LoRA vs full fine-tuning vs
the frozen lower bound, side by side in one run.

Writes under ``bench/results/<device>/``: ``results.csv`` (long format: method, backend, mode,
metric, x_name, x_value, p20, p50, p80, device, torch, triton), ``summary.md`` and PNG plots.
Each measurement runs in its own process (``bench.worker``) so its peak memory is its own. The
files are rewritten after every run, and ``--max-seconds`` stops starting runs that would not end
in time, so a time-boxed GPU window still leaves the measurements it finished.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from hifi_fast.backends import available_backends

from .setup_methods import check_model

FIELDS = ["method", "backend", "mode", "metric", "x_name", "x_value", "p20", "p50", "p80", "device", "torch", "triton"]
SUITES = {
    # model, batch, seq, timed steps per round, sweeps {x_name: values}
    "quick": {"cpu": ("minilm", 16, 64, 10, {}), "cuda": ("bert-base", 32, 128, 30, {})},
    "full": {
        "cpu": ("minilm", 16, 64, 10, {"seq_len": [32, 64, 128, 256], "heads_per_layer": [1, 2, 4, 12], "batch_size": [4, 16, 32]}),
        "cuda": ("bert-base", 32, 128, 30, {"seq_len": [128, 256, 512, 1024, 2048], "heads_per_layer": [1, 2, 4, 12], "batch_size": [8, 32, 64]}),
    },
}
METHODS = [("frozen", {}), ("hifi", {}), ("lora", {"lora_r": 8}), ("lora", {"lora_r": 16}), ("full", {})]


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0).replace(" ", "-")
    return f"cpu-{platform.machine()}-{torch.get_num_threads()}threads"


def label(method: str, options: dict) -> str:
    return f"lora-r{options['lora_r']}" if method == "lora" else method


def run_worker(spec: dict, backend: str = "") -> dict:
    env = {**os.environ, "HIFI_FAST_BACKEND": backend} if backend else None
    proc = subprocess.run([sys.executable, "-m", "bench.worker", json.dumps(spec)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark worker failed for {spec}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def pool(results: list[dict]) -> dict:
    """One result from several rounds of the same measurement: all step times, median memory."""
    pooled = dict(results[0], step_times=[t for r in results for t in r["step_times"]])
    for key in ("peak_mb", "base_mb"):
        pooled[key] = float(np.median([r[key] for r in results]))
    return pooled


def percentiles(values) -> tuple[float, float, float]:
    p20, p50, p80 = np.percentile(np.asarray(values, dtype=float), [20, 50, 80])
    return float(p20), float(p50), float(p80)


def train_rows(method, backend, x_name, x_value, spec, result, common) -> list[dict]:
    tokens = spec["batch_size"] * spec["seq_len"]
    step = percentiles(result["step_times"])
    tps = percentiles([tokens / t for t in result["step_times"]])
    base = dict(method=method, backend=backend, mode="train_step", x_name=x_name, x_value=x_value, **common)
    scalar = lambda v: (v, v, v)  # noqa: E731
    metrics = {
        "step_time_s": step,
        "tokens_per_s": tps,
        "peak_mem_mb": scalar(result["peak_mb"]),
        "train_mem_mb": scalar(result["peak_mb"] - result["base_mb"]),
        "trainable_params": scalar(result["trainable_params"]),
        "checkpoint_mb": scalar(result["checkpoint_bytes"] / 2**20),
    }
    return [dict(base, metric=m, p20=v[0], p50=v[1], p80=v[2]) for m, v in metrics.items()]


def plan(suite: str, device: str, methods: list[str] | None = None) -> tuple[list[tuple], dict]:
    """The jobs of ``suite`` on ``device`` (only the ``methods`` labels given, default all) and the
    default spec."""
    model, batch, seq, steps, sweeps = SUITES[suite][device]
    defaults = dict(model=model, device=device, dtype="float32", seed=0, batch_size=batch, seq_len=seq,
                    heads_per_layer=1, lora_r=8, warmup=3, steps=steps)
    chosen = [m for m in METHODS if methods is None or label(*m) in methods]
    jobs = []
    for method, options in chosen:
        for backend in available_backends(device) if method == "hifi" else [""]:
            jobs.append((method, options, backend, "config", "default", {}))
    for x_name, values in sweeps.items():
        swept = [m for m in chosen if m[0] == "hifi"] if x_name == "heads_per_layer" else \
            [m for m in chosen if m[1].get("lora_r", 8) == 8]
        for value in values:
            for method, options in swept:
                jobs.append((method, options, "torch" if method == "hifi" else "", x_name, value, {x_name: value}))
    return jobs, defaults


def summary_table(rows: list[dict]) -> str:
    """Markdown table of the default configuration, with ratios to frozen and to LoRA r=8."""
    default = [r for r in rows if r["mode"] == "train_step" and r["x_name"] == "config"]
    get = lambda name, backend, metric: next(  # noqa: E731
        r["p50"] for r in default if r["method"] == name and r["backend"] == backend and r["metric"] == metric
    )
    names = list(dict.fromkeys((r["method"], r["backend"]) for r in default))
    has = {name for name, _ in names}
    frozen_tps = get("frozen", "", "tokens_per_s") if "frozen" in has else None
    lora_tps = get("lora-r8", "", "tokens_per_s") if "lora-r8" in has else None
    lora_mem = get("lora-r8", "", "train_mem_mb") if "lora-r8" in has else None
    ratio = lambda a, b: f"{a / b:.2f}x" if b else "-"  # noqa: E731
    lines = [
        "| method | backend | step ms (p50) | tokens/s (p20-p80) | speed vs frozen | speed vs lora-r8 | train mem MiB | mem vs lora-r8 | trainable params | checkpoint MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, backend in names:
        tps = next(r for r in default if r["method"] == name and r["backend"] == backend and r["metric"] == "tokens_per_s")
        mem = get(name, backend, "train_mem_mb")
        lines.append(
            f"| {name} | {backend or '-'} | {1000 * get(name, backend, 'step_time_s'):.1f} | "
            f"{tps['p50']:.0f} ({tps['p20']:.0f}-{tps['p80']:.0f}) | {ratio(tps['p50'], frozen_tps)} | "
            f"{ratio(tps['p50'], lora_tps)} | {mem:.0f} | {ratio(mem, lora_mem)} | "
            f"{get(name, backend, 'trainable_params'):,.0f} | {get(name, backend, 'checkpoint_mb'):.2f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    default = [r for r in rows if r["x_name"] == "config" and r["metric"] == "tokens_per_s"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = [f"{r['method']}{'/' + r['backend'] if r['backend'] else ''}" for r in default]
    ax.bar(names, [r["p50"] for r in default], yerr=[[r["p50"] - r["p20"] for r in default], [r["p80"] - r["p50"] for r in default]])
    ax.set_ylabel("tokens/s (p50, p20-p80)")
    ax.set_title(f"training step throughput — {title}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=120)
    plt.close(fig)
    for x_name in sorted({r["x_name"] for r in rows} - {"config", "examples"}):
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
        for metric, ax in zip(("step_time_s", "train_mem_mb"), axes):
            sweep = [r for r in rows if r["x_name"] == x_name and r["metric"] == metric]
            for name in sorted({r["method"] for r in sweep}):
                points = sorted((float(r["x_value"]), r["p50"]) for r in sweep if r["method"] == name)
                ax.plot(*zip(*points), marker="o", label=name)
            ax.set_xlabel(x_name)
            ax.set_ylabel(metric)
            ax.set_xscale("log", base=2)
            ax.legend(fontsize=7)
        fig.suptitle(f"{x_name} scaling — {title}", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / f"scaling_{x_name}.png", dpi=120)
        plt.close(fig)


class Report:
    """``results.csv``, ``summary.md`` and plots from the runs finished so far (``write`` after each)."""

    def __init__(self, out: Path, jobs: list[tuple], specs: list[dict], common: dict, suite: str, rounds: int,
                 defaults: dict, scoring_examples: int):
        self.out, self.jobs, self.specs, self.common = out, jobs, specs, common
        self.suite, self.rounds, self.defaults, self.scoring_examples = suite, rounds, defaults, scoring_examples
        self.runs_planned = sum(rounds if job[3] == "config" else 1 for job in jobs)
        self.results: dict[int, list[dict]] = {}
        self.scoring: dict | None = None

    def rows(self) -> list[dict]:
        rows = []
        for i, results in sorted(self.results.items()):
            method, options, backend, x_name, x_value, _ = self.jobs[i]
            rows += train_rows(label(method, options), backend, x_name, x_value, self.specs[i], pool(results), self.common)
        for what, times in (self.scoring or {}).items():
            p = percentiles(times)
            rows.append(dict(method=what, backend="", mode="scoring", metric="seconds", x_name="examples",
                             x_value=self.scoring_examples, p20=p[0], p50=p[1], p80=p[2], **self.common))
        return rows

    def write(self, final: bool) -> None:
        rows = self.rows()
        with open(self.out / "results.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        d = self.defaults
        title = f"{d['model']} ({d['dtype']}), batch {d['batch_size']} x {d['seq_len']} tokens, {self.common['device']}"
        runs_done = sum(len(results) for results in self.results.values())
        done = "" if runs_done == self.runs_planned else (
            f"**Partial: {runs_done} of {self.runs_planned} runs finished"
            f"{' (stopped by --max-seconds)' if final else ''}; medians over the rounds each method got.**\n\n")
        table = summary_table(rows) if rows else "(no run finished)"
        (self.out / "summary.md").write_text(
            f"# Benchmarks: {title}\n\n{done}torch {self.common['torch']}, triton {self.common['triton'] or '-'}, "
            f"suite {self.suite}, {self.rounds} rounds x {d['steps']} timed steps after {d['warmup']} warm-up (forward + backward + AdamW "
            f"step), methods interleaved round by round; memory is the median over rounds.\n\n{table}\n\n"
            + self.scoring_line(final) + "\n"
        )
        if final and rows:
            plot(rows, self.out, title)

    def scoring_line(self, final: bool) -> str:
        s = self.scoring
        if s is None:
            return f"- scoring pass: not measured{' (no time left)' if final else ' yet'}"
        line = (f"- scoring pass over {self.scoring_examples} examples: {np.median(s['scoring']):.3f} s = "
                f"{np.median(s['scoring']) / np.median(s['forward']):.2f}x a plain forward over the same batches "
                f"({np.median(s['forward']):.3f} s)")
        if "naive_svdvals_loop" in s:
            line += (f"; {np.median(s['naive_svdvals_loop']) / np.median(s['scoring']):.1f}x faster than a per-head "
                     f"`svdvals` loop ({np.median(s['naive_svdvals_loop']):.3f} s)")
        return line


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=sorted(SUITES), default="quick")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", help="override the suite's model: minilm, bert-base, llama-1b, tiny-bert, tiny-llama, "
                                        "or a local Hugging Face directory (e.g. .whl/minilm-l6 from bench/gpu_pack.sh)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="precision of the model's weights (default: float32)")
    parser.add_argument("--methods", help="comma-separated subset of " + ", ".join(label(*m) for m in METHODS)
                        + " (default: all)")
    parser.add_argument("--steps", type=int, help="override the number of timed steps per round")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds over the methods at the default configuration, interleaved so that drifts of "
                             "a shared machine spread over all methods alike (default: 3)")
    parser.add_argument("--scoring-examples", type=int, default=256,
                        help="examples of the scoring-pass benchmark (default 256; any number >= 1)")
    parser.add_argument("--no-naive-scoring", action="store_true",
                        help="leave out the naive per-head svdvals loop of the scoring benchmark (slow on big models)")
    parser.add_argument("--out", type=Path, help="output folder (default bench/results/<device name>)")
    parser.add_argument("--max-seconds", type=float,
                        help="start no run (nor the scoring benchmark) that would end after this many seconds, "
                             "judged by the longest run so far; the report says what was left out")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    if args.max_seconds is not None and args.max_seconds <= 0:
        parser.error(f"--max-seconds must be positive, got {args.max_seconds}")
    if args.scoring_examples < 1:
        parser.error(f"--scoring-examples must be at least 1, got {args.scoring_examples}")
    if args.model is not None:
        try:
            check_model(args.model)
        except ValueError as err:
            parser.error(f"--model: {err}")
    labels = [label(*m) for m in METHODS]
    methods = None if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]
    if methods is not None and (not methods or set(methods) - set(labels)):
        parser.error(f"--methods: choose from {', '.join(labels)}; got {args.methods!r}")
    jobs, defaults = plan(args.suite, args.device, methods)
    defaults.update({k: v for k, v in (("model", args.model), ("steps", args.steps)) if v is not None})
    defaults["dtype"] = args.dtype
    name = device_name(args.device)
    out = args.out or Path(__file__).parent / "results" / name
    out.mkdir(parents=True, exist_ok=True)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    common = dict(device=name, torch=torch.__version__, triton=triton_version)
    # The default configuration runs round-robin (every method's round r before any method's round
    # r + 1); a sweep point runs once, with as many timed steps as the rounds together.
    specs = [{**defaults, **options, **override, "method": method,
              **({} if x_name == "config" else {"steps": defaults["steps"] * args.rounds})}
             for method, options, _, x_name, _, override in jobs]
    config = [i for i, job in enumerate(jobs) if job[3] == "config"]
    ordered = config * args.rounds + [i for i, job in enumerate(jobs) if job[3] != "config"]
    report = Report(out, jobs, specs, common, args.suite, args.rounds, defaults, args.scoring_examples)
    started, longest = time.monotonic(), 0.0

    def in_time() -> bool:
        """Whether another run, as long as the longest so far, still ends within --max-seconds."""
        return args.max_seconds is None or time.monotonic() - started + longest <= args.max_seconds

    for i in tqdm(ordered, desc="benchmarks", unit="run"):
        if not in_time():
            break
        t0 = time.monotonic()
        report.results.setdefault(i, []).append(run_worker(specs[i], jobs[i][2]))
        longest = max(longest, time.monotonic() - t0)
        report.write(final=False)
    if in_time():
        report.scoring = run_worker(dict(defaults, mode="scoring", num_examples=args.scoring_examples, repeats=3,
                                         naive=not args.no_naive_scoring))
    report.write(final=True)
    print((out / "summary.md").read_text())
    return out


if __name__ == "__main__":
    main()
