"""``bench.selection_study`` end to end on a tiny random BERT and a synthetic task (no downloads):
splits, rate tuning on validation, paired runs, resumability, the shared-selection shortcut and
the report."""
import json
import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
from test_cli import NEGATIVE, NEUTRAL, POSITIVE, tiny_model_dir  # noqa: E402,F401  (fixture)

from bench import selection_study as study_module  # noqa: E402
from bench.selection_study import SelectionStudy, Task, TaskData, t_interval  # noqa: E402

CLASSES = {"positive": POSITIVE, "negative": NEGATIVE, "neutral": NEUTRAL}


def tiny_texts():
    rng = random.Random(0)
    texts, labels = [], []
    for i in range(150):
        label = list(CLASSES)[i % 3]
        texts.append(" ".join(rng.choice(NEUTRAL) for _ in range(3)) + " "
                     + " ".join(rng.choice(CLASSES[label]) for _ in range(2)) + f" {i % 7}")
        labels.append(label)
    texts.append(texts[0])  # a duplicate with the same label: kept once
    labels.append(labels[0])
    texts.append(texts[1])  # a duplicate with another label: dropped both times
    labels.append("negative" if labels[1] != "negative" else "positive")
    return texts, labels


TINY = Task("tiny", tiny_texts, "synthetic")


def make_study(tmp_path, model_dir, **kw):
    return SelectionStudy(tmp_path / "runs", tmp_path / "docs", tasks={"tiny": TINY}, model=str(model_dir),
                          threads=1, steps=3, batch_size=8, max_length=16, eval_size=30, val_size=15,
                          sizes=(8, 16), seeds=(0, 1), **kw)


def test_t_interval():
    mean, half = t_interval([1, 2, 3, 4, 5])
    assert mean == 3 and half == pytest.approx(2.776 * 1.5811388 / 5 ** 0.5, rel=1e-4)
    assert t_interval([2.0])[0] == 2.0


def test_splits_are_balanced_nested_and_disjoint(tmp_path):
    data = TaskData(TINY, tmp_path, eval_size=30, val_size=15, max_size=16)
    assert len(data.texts) == 149  # 152 rows, one exact duplicate and one conflicting pair removed

    def rows(path):
        lines = path.read_text().splitlines()[1:]
        return [line.rsplit(",", 1) for line in lines]

    held = {text for text, _ in rows(data.split_path("eval")) + rows(data.split_path("val"))}
    assert len(held) == 45
    for size in (8, 16):
        for seed in (0, 1):
            train = rows(data.train_path(size, seed))
            counts = sorted(sum(label == c for _, label in train) for c in CLASSES)
            assert len(train) == size and counts[-1] - counts[0] <= 1
            assert not held & {text for text, _ in train}
    small, large = ({t for t, _ in rows(data.train_path(n, 0))} for n in (8, 16))
    assert small < large
    assert rows(data.train_path(8, 0)) != rows(data.train_path(8, 1))


def test_study_runs_resumes_and_reports(tmp_path, tiny_model_dir, monkeypatch):  # noqa: F811
    methods = ["hifi-pagerank", "hifi-correlation", "hifi-random", "frozen"]
    study = make_study(tmp_path, tiny_model_dir)
    study.execute(["tiny"], [8], [0, 1], methods)
    records = [json.loads(line) for line in study.records_path.read_text().splitlines()]
    evals = [r for r in records if r["split"] == "eval"]
    assert len(evals) == 2 * len(methods)
    vals = [r for r in records if r["split"] == "val"]
    assert {r["method"] for r in vals} == {"hifi-random", "frozen"}  # the other variants take random's rate
    assert {r["epochs"] for r in records} == {3}  # 8 examples / batch 8 = 1 step an epoch; 3 steps asked
    rate = study.chosen_lr("tiny", 8, study_module.BY_NAME["hifi-random"], tune=False)
    assert {r["lr"] for r in evals if r["method"].startswith("hifi-")} == {rate}
    for r in evals:  # a copied run trained exactly the heads of the run it copies
        if r.get("same_as"):
            source = study.records[study.key("tiny", 8, "eval", r["same_as"], r["lr"], r["seed"])]
            assert source["selected_heads"] == r["selected_heads"] and source["accuracy"] == r["accuracy"]

    report = (tmp_path / "docs" / "selection_study.md").read_text()
    assert "## Paired differences against random heads" in report
    assert "hifi-pagerank − hifi-random" in report and "frozen − hifi-random" in report
    assert (tmp_path / "docs" / "selection_study" / "accuracy_vs_size.png").stat().st_size > 0
    csv_rows = (tmp_path / "docs" / "selection_study" / "results.csv").read_text().splitlines()
    assert len(csv_rows) == len(records) + 1

    # A second study over the same records runs nothing more.
    def no_run(*_, **__):
        raise AssertionError("a finished run was run again")

    monkeypatch.setattr("hifi_fast.cli.classify.run_finetune", no_run)
    again = make_study(tmp_path, tiny_model_dir)
    again.execute(["tiny"], [8], [0, 1], methods)
    assert again.records == study.records
    done, left, keys = again.plan(["tiny"], [8, 16], [0, 1], methods)
    assert left == len(keys) and all("/n16/" in key for key in keys) and done == len(records)
    assert again.forget(["*/hifi-pagerank/*"]) == 2
    assert len(make_study(tmp_path, tiny_model_dir).records) == len(records) - 2


def test_rate_check_tunes_a_variant_on_its_own(tmp_path, tiny_model_dir):  # noqa: F811
    study = make_study(tmp_path, tiny_model_dir)
    own = study.own_rate("tiny", 8, "hifi-pagerank")
    assert {(r["method"], r["split"]) for r in study.records.values()} == {("hifi-pagerank", "val")}
    assert own in {r["lr"] for r in study.records.values()}
    shared = study.chosen_lr("tiny", 8, study_module.BY_NAME["hifi-pagerank"])  # runs the control's grid
    study.report()
    report = (tmp_path / "docs" / "selection_study.md").read_text()
    verdict = "is" if own == shared else "is not"
    assert f"rate check: its own best {verdict} the hifi-random rate it ran at ({shared:g})" in report


def test_a_variant_with_another_head_count_trains_that_many_at_its_own_rate(tmp_path, tiny_model_dir):  # noqa: F811
    study = make_study(tmp_path, tiny_model_dir)
    study.execute(["tiny"], [8], [0], ["hifi-random", "hifi-random-k1"])
    for name in ("hifi-random", "hifi-random-k1"):  # each tuned on its own grid (an edge may extend it)
        tried = {r["lr"] for r in study.records.values() if (r["method"], r["split"]) == (name, "val")}
        assert tried >= set(study_module.HIFI_GRID)
    heads = {r["method"]: r["selected_heads"] for r in study.records.values() if r["split"] == "eval"}
    assert {len(h) for h in heads["hifi-random-k1"].values()} == {1}
    assert {len(h) for h in heads["hifi-random"].values()} == {study_module.HEADS_PER_LAYER}
    assert "(except hifi-random-k1: 1)" in (tmp_path / "docs" / "selection_study.md").read_text()
