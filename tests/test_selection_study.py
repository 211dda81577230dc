"""``bench.selection_study`` end to end on a tiny random BERT and a synthetic task (no downloads):
splits, rate tuning on validation, paired runs, resumability, the shared-selection shortcut and
the report."""
import json
import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
from test_cli import NEGATIVE, NEUTRAL, POSITIVE, tiny_model_dir  # noqa: E402,F401  (fixture)

from bench.selection_study import plan, report  # noqa: E402
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
    rate = study.chosen_lr("tiny", 8, plan.BY_NAME["hifi-random"], tune=False)
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


@pytest.mark.parametrize("variant", ["pagerank-own-rate", "random-k1"])
def test_a_variant_with_its_own_grid_is_tuned_and_trained_on_its_own(tmp_path, tiny_model_dir, variant):  # noqa: F811
    name = f"hifi-{variant}"
    study = make_study(tmp_path, tiny_model_dir)
    study.execute(["tiny"], [8], [0], ["hifi-random", name])
    for tuned in ("hifi-random", name):  # each on its own grid (an edge may extend it)
        tried = {r["lr"] for r in study.records.values() if (r["method"], r["split"]) == (tuned, "val")}
        assert tried >= set(plan.HIFI_GRID)
    own = study.chosen_lr("tiny", 8, plan.BY_NAME[name], tune=False)
    control = study.chosen_lr("tiny", 8, plan.BY_NAME["hifi-random"], tune=False)
    run = study.records[study.key("tiny", 8, "eval", name, own, 0)]
    per_layer = plan.HIFI_VARIANTS[variant].heads_per_layer
    assert {len(heads) for heads in run["selected_heads"].values()} == {per_layer}
    report = (tmp_path / "docs" / "selection_study.md").read_text()
    assert f"{'the same as' if own == control else 'not'} hifi-random's ({control:g})" in report
    assert "(except hifi-random-k1: 1)" in report


def test_same_options_rate_and_seed_copy_the_run(tmp_path, tiny_model_dir, monkeypatch):  # noqa: F811
    study = make_study(tmp_path, tiny_model_dir)
    done = study.run("tiny", 8, "eval", plan.BY_NAME["hifi-importance"], 1e-3, 0)

    def no_run(*_, **__):
        raise AssertionError("the same computation was run again")

    monkeypatch.setattr("hifi_fast.cli.classify.run_finetune", no_run)
    copied = study.run("tiny", 8, "eval", plan.BY_NAME["hifi-importance-own-rate"], 1e-3, 0)
    assert copied["same_as"] == "hifi-importance" and copied["method"] == "hifi-importance-own-rate"
    assert (copied["accuracy"], copied["selected_heads"]) == (done["accuracy"], done["selected_heads"])


def test_head_overlaps_compare_variants_with_pageranks_head_count():
    assert report._same_head_count("hifi-pagerank") and report._same_head_count("hifi-importance-initial")
    assert not report._same_head_count("hifi-random-k1") and not report._same_head_count("lora-r8")
