"""Running the grid: every run through the command line's own ``run_finetune``, each finished run a
line of ``runs.jsonl``, rates tuned on validation first, runs with a finished twin copied."""
from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.accuracy import Method
from .plan import (
    BY_NAME, CONTROL, EXECUTION_FIRST, GROUPS, METHODS, PREDICTABLE_SCORES, SEEDS, SIZES, TASKS, TUNE_SEED, Task,
    TaskData, predictable, score_of,
)
from .report import write_report


def selection_code_hash() -> str:
    """Short hash of the installed scoring/selection sources: a run records it, so a report can
    tell runs of one definition of a score from runs of another."""
    import hifi_fast

    root = Path(hifi_fast.__file__).parent
    digest = hashlib.sha256()
    for name in ("config.py", "heads.py", "selecting/batches.py", "selecting/scoring.py", "selecting/pagerank.py",
                 "selecting/selection.py", "selecting/importance.py"):
        if (root / name).exists():
            digest.update(name.encode() + (root / name).read_bytes())
    return digest.hexdigest()[:12]


@dataclass
class SelectionStudy:
    runs_dir: Path
    docs_dir: Path
    tasks: dict[str, Task] = field(default_factory=lambda: dict(TASKS))
    model: str | None = None
    threads: int | None = None
    steps: int = 100
    batch_size: int = 16
    max_length: int = 64
    eval_size: int = 2000
    val_size: int = 1000
    sizes: tuple[int, ...] = SIZES
    seeds: tuple[int, ...] = SEEDS
    max_extensions: int = 1
    quiet: bool = True
    records: dict[str, dict] = field(default_factory=dict)
    _data: dict[str, TaskData] = field(default_factory=dict)
    _predicted: dict[tuple, dict[str, dict]] = field(default_factory=dict)
    _code: str = ""

    def __post_init__(self) -> None:
        self.out_dir = self.docs_dir / "selection_study"  # records, CSV and plot
        self.records_path = self.out_dir / "runs.jsonl"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.records_path.exists():
            for line in self.records_path.read_text().splitlines():
                if line.strip():
                    record = json.loads(line)
                    self.records[record["key"]] = record

    def data(self, task: str) -> TaskData:
        if task not in self._data:
            self._data[task] = TaskData(self.tasks[task], self.runs_dir / "data" / task, self.eval_size,
                                        self.val_size, max(self.sizes))
        return self._data[task]

    def epochs(self, size: int) -> int:
        return math.ceil(self.steps / math.ceil(size / self.batch_size))

    @staticmethod
    def key(task: str, size: int, split: str, method: str, lr: float, seed: int) -> str:
        return f"{task}/n{size}/{split}/{method}/lr{lr:g}/seed{seed}"

    def forget(self, patterns: Sequence[str]) -> int:
        """Drop the records whose key matches a glob (e.g. ``*/hifi-pagerank/*`` after the score's
        definition changed), so that the next run makes them again; returns how many."""
        from fnmatch import fnmatch

        gone = [k for k in self.records if any(fnmatch(k, p) for p in patterns)]
        for key in gone:
            del self.records[key]
        tmp = self.records_path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.records.values()))
        tmp.replace(self.records_path)
        return len(gone)

    # --------------------------------------------------------------------------------- running

    def argv(self, task: str, size: int, split: str, method: Method, lr: float, seed: int) -> list[str]:
        data = self.data(task)
        argv = ["finetune", *method.args, "--train", str(data.train_path(size, seed)),
                "--eval", str(data.split_path(split)),
                "--max-train-examples", "0", "--max-eval-examples", "0", "--epochs", str(self.epochs(size)),
                "--batch-size", str(self.batch_size), "--max-length", str(self.max_length),
                "--lr", f"{lr:g}", "--seed", str(seed), "--no-save",
                "--output-dir", str(self.runs_dir / "runs" / self.key(task, size, split, method.name, lr, seed))]
        argv += ["--model", self.model] if self.model else []
        argv += ["--threads", str(self.threads)] if self.threads else []
        return argv + (["--quiet"] if self.quiet else [])

    def run(self, task: str, size: int, split: str, method: Method, lr: float, seed: int) -> dict:
        key = self.key(task, size, split, method.name, lr, seed)
        if key in self.records:
            return self.records[key]
        base = {"key": key, "task": task, "size": size, "split": split, "method": method.name, "lr": lr,
                "seed": seed, "epochs": self.epochs(size), "batch_size": self.batch_size}
        record = self._same_selection(task, size, split, method, lr, seed)
        if record is None:
            from hifi_fast.cli.classify import run_finetune
            from hifi_fast.cli.parse import build_parser

            print(f"[{time.strftime('%H:%M:%S')}] {key}", flush=True)
            metrics = run_finetune(build_parser().parse_args(self.argv(task, size, split, method, lr, seed)))
            record = {k: metrics[k] for k in (
                "accuracy", "macro_f1", "majority_accuracy", "trainable_params", "steps", "final_train_loss",
                "train_time_s", "scoring_time_s", "eval_time_s", "total_time_s", "threads", "num_train",
                "num_eval", "selected_heads")}
            record.update(code=self._code or selection_code_hash(), finished=time.strftime("%Y-%m-%d %H:%M:%S"))
            self._check_prediction(task, size, seed, method, record)
        record = {**base, **record}
        self.records[key] = record
        with open(self.records_path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        self.report()
        return record

    def _same_selection(self, task, size, split, method, lr, seed) -> dict | None:
        """A finished run of another method that made the same computation as ``method`` would (same
        task, size, split, seed and rate, and the same options, or for HiFi variants with no other
        option the same heads), copied with ``same_as``; ``None`` if there is none."""
        def finished(same) -> list[dict]:
            runs = [self.records.get(self.key(task, size, split, other.name, lr, seed))
                    for other in METHODS if other.name != method.name and same(other)]
            return [r for r in runs if r and not r.get("same_as")]

        def copy(done: dict) -> dict:
            return {**{k: v for k, v in done.items() if k not in ("key", "method")}, "same_as": done["method"]}

        same_options = finished(lambda other: other.args == method.args)
        if same_options:
            return copy(same_options[0])
        if not predictable(method):
            return None
        candidates = finished(predictable)
        if not candidates:  # nothing to copy from: no scoring pass needed
            return None
        heads = self.predicted(task, size, seed)[score_of(method)]
        return next((copy(done) for done in candidates if done["selected_heads"] == heads), None)

    def predicted(self, task: str, size: int, seed: int) -> dict[str, dict]:
        """The heads each predictable score selects for this training set: one scoring pass, as
        ``hifi-fast finetune`` makes it (same model, examples, batches, config)."""
        cache_key = (task, size, seed)
        if cache_key not in self._predicted:
            import hifi_fast
            from hifi_fast.cli.console import quiet_transformers
            from hifi_fast.cli.loading import load_classifier, load_tokenizer, resolve_model_path
            from hifi_fast.cli.parse import build_parser
            from hifi_fast.cli.data import encode, iter_batches, load_data

            quiet_transformers(self.quiet)
            args = build_parser().parse_args(self.argv(task, size, "val", BY_NAME[CONTROL], 1.0, seed))
            splits = load_data(args.train, args.eval, max_train_examples=None, max_eval_examples=None, seed=seed)
            path = resolve_model_path(args.model)
            tokenizer = load_tokenizer(path)
            model = load_classifier(path, splits.label_names, tokenizer, seed)
            data = encode(tokenizer, splits.train.texts, splits.train.labels, args.max_length)
            scores = hifi_fast.score_heads(model, iter_batches(data, args.batch_size), damping=args.damping,
                                           num_examples=args.scoring_examples, progress=False)
            self._predicted[cache_key] = {
                score: {str(k): v for k, v in hifi_fast.select_heads(scores, hifi_fast.HiFiConfig(
                    heads_per_layer=args.heads_per_layer, score=score, selection=args.selection,
                    num_scoring_examples=args.scoring_examples, damping=args.damping, seed=seed)).heads.items()}
                for score in PREDICTABLE_SCORES}
        return self._predicted[cache_key]

    def _check_prediction(self, task, size, seed, method, record) -> None:
        if not predictable(method):
            return
        predicted = self._predicted.get((task, size, seed), {}).get(score_of(method))
        if predicted is not None and predicted != record["selected_heads"]:
            raise RuntimeError(f"{record}: trained heads {record['selected_heads']} differ from the predicted "
                               f"{predicted}; the selection shortcut no longer mirrors hifi-fast finetune")

    # ---------------------------------------------------------------------------- learning rates

    def chosen_lr(self, task: str, size: int, method: Method, tune: bool = True) -> float | None:
        """The rate for ``method`` on this task and size: fixed, another method's, or the best on the
        validation split (running the grid first unless ``tune`` is false; ``None`` if not tuned yet)."""
        if method.fixed_lr is not None:
            return method.fixed_lr
        if method.lr_from is not None:
            return self.chosen_lr(task, size, BY_NAME[method.lr_from], tune)
        grid = sorted(method.lr_grid)
        for _ in range(self.max_extensions + 1):
            tried = {}
            for lr in grid:
                key = self.key(task, size, "val", method.name, lr, TUNE_SEED)
                if key in self.records or tune:
                    tried[lr] = self.run(task, size, "val", method, lr, TUNE_SEED)
            if len(tried) < len(grid):
                return None
            score = {lr: (tried[lr]["accuracy"], tried[lr]["macro_f1"]) for lr in grid}
            best = max(grid, key=score.get)
            inner = grid[1] if best == grid[0] else grid[-2]  # the edge's neighbour
            if (best not in (grid[0], grid[-1]) or score[best] <= score[inner]
                    or len(grid) >= len(method.lr_grid) + self.max_extensions):
                return best
            ratio = grid[1] / grid[0]
            grid = [best / ratio, *grid] if best == grid[0] else [*grid, best * ratio]
            grid = [float(f"{lr:.3g}") for lr in grid]
        return best

    # ------------------------------------------------------------------------------------ order

    def execute(self, tasks: Sequence[str], sizes: Sequence[int], seeds: Sequence[int], methods: Sequence[str]) -> None:
        """Size by size (smallest first); within a size the HiFi variants before the baselines;
        within those, rates first, then seed by seed, so a partial study has complete pairs."""
        for size in sizes:
            for group in GROUPS.values():
                chosen = sorted((BY_NAME[name] for name in group if name in methods),
                                key=lambda m: EXECUTION_FIRST.index(m.name) if m.name in EXECUTION_FIRST else 99)
                if not chosen:
                    continue
                rates = {(task, m.name): self.chosen_lr(task, size, m) for task in tasks for m in chosen}
                for seed in seeds:
                    for task in tasks:
                        for method in chosen:
                            self.run(task, size, "eval", method, rates[task, method.name], seed)
        self.report()

    def plan(self, tasks: Sequence[str], sizes: Sequence[int], seeds: Sequence[int],
             methods: Sequence[str]) -> tuple[int, int, list[str]]:
        """(finished, remaining, remaining keys) of the grid; rates not tuned yet count their base grid
        and their eval runs show ``lr?``."""
        done, remaining = set(), []
        for size in sizes:
            for task in tasks:
                for name in methods:
                    method = BY_NAME[name]
                    tuned = method if method.lr_from is None else BY_NAME[method.lr_from]
                    keys = [self.key(task, size, "val", tuned.name, lr, TUNE_SEED) for lr in tuned.lr_grid]
                    keys += [k for k, r in self.records.items()  # grid extensions
                             if (r["task"], r["size"], r["split"], r["method"]) == (task, size, "val", tuned.name)]
                    lr = self.chosen_lr(task, size, method, tune=False)
                    keys += [self.key(task, size, "eval", name, lr, seed) if lr else
                             f"{task}/n{size}/eval/{name}/lr?/seed{seed}" for seed in seeds]
                    for key in keys:
                        if key in self.records:
                            done.add(key)
                        elif key not in remaining:
                            remaining.append(key)
        return len(done), len(remaining), remaining

    # ----------------------------------------------------------------------------------- report

    def report(self) -> None:
        write_report(self)
