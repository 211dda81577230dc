"""``hifi-fast`` end to end on a tiny random BERT saved to a temporary directory (no downloads)."""
import json
import os
import random
import re
import shlex

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast  # noqa: E402

import hifi_fast  # noqa: E402
from hifi_fast import cli  # noqa: E402
from hifi_fast.cli.compare import argv_for  # noqa: E402
from hifi_fast.cli.parse import normalise_argv  # noqa: E402
from hifi_fast.cli.data import encode, load_data  # noqa: E402
from hifi_fast.cli.train import evaluate  # noqa: E402
from conftest import random_scores  # noqa: E402

POSITIVE = ["good", "great", "love", "happy", "nice", "wonderful"]
NEGATIVE = ["bad", "awful", "hate", "sad", "terrible", "boring"]
NEUTRAL = ["the", "a", "movie", "food", "day", "was", "it", "is", "today", "weather"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny random BERT (2 layers, 4 heads of 8) with a word-level tokenizer, saved like a hub model."""
    path = tmp_path_factory.mktemp("tiny-bert")
    vocab = path / "vocab.txt"
    vocab.write_text("\n".join(SPECIAL + POSITIVE + NEGATIVE + NEUTRAL) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True)
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(SPECIAL + POSITIVE + NEGATIVE + NEUTRAL), hidden_size=32,
                        num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                        max_position_embeddings=64)
    BertForSequenceClassification(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_csv(tmp_path_factory):
    """90 short texts in 3 classes (word-level, so the tiny model can learn something)."""
    rng = random.Random(0)
    rows = ["text,label"]
    for i in range(90):
        label, words = [("positive", POSITIVE), ("negative", NEGATIVE), ("neutral", NEUTRAL)][i % 3]
        text = " ".join(rng.choice(NEUTRAL) for _ in range(3)) + " " + " ".join(rng.choice(words) for _ in range(2))
        rows.append(f"{text},{label}")
    path = tmp_path_factory.mktemp("data") / "tiny.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def finetune_argv(model_dir, data, out, *extra):
    return ["finetune", "--model", str(model_dir), "--train", str(data), "--output-dir", str(out),
            "--epochs", "2", "--batch-size", "8", "--max-length", "16", "--scoring-examples", "16",
            "--lr", "5e-3", "--quiet", *extra]


@pytest.fixture(scope="module")
def hifi_run(tiny_model_dir, tiny_csv, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "hifi"
    assert cli.main(finetune_argv(tiny_model_dir, tiny_csv, out, "--heads-per-layer", "1", "--score", "pagerank")) == 0
    return out


def test_finetune_writes_the_run(hifi_run, tiny_model_dir):
    for name in ("metrics.json", "selection.json", "heads.png", "run_config.json",
                 "hifi_config.json", "hifi_weights.safetensors"):
        assert (hifi_run / name).is_file(), name
    metrics = json.loads((hifi_run / "metrics.json").read_text())
    assert metrics["method"] == "hifi"
    assert 0.0 <= metrics["accuracy"] <= 1.0 and 0.0 <= metrics["macro_f1"] <= 1.0
    assert metrics["num_train"] == 81 and metrics["num_eval"] == 9
    assert metrics["majority_accuracy"] == pytest.approx(3 / 9)
    assert metrics["label_names"] == ["negative", "neutral", "positive"]
    assert 0 < metrics["trainable_params"] < metrics["total_params"]
    assert metrics["checkpoint_mb"] > 0 and metrics["peak_memory_mb"] > 0
    assert sum(len(v) for v in metrics["selected_heads"].values()) == 2  # 1 head x 2 layers
    selection = hifi_fast.HeadSelection.from_json((hifi_run / "selection.json").read_text())
    assert selection.heads == {int(k): v for k, v in metrics["selected_heads"].items()}
    assert selection.scores is not None and tuple(selection.scores.pagerank.shape) == (2, 4)
    run_config = json.loads((hifi_run / "run_config.json").read_text())
    assert run_config["label_names"] == ["negative", "neutral", "positive"]
    hifi_config = json.loads((hifi_run / "hifi_config.json").read_text())
    assert hifi_config["base_model_name_or_path"] == str(tiny_model_dir.resolve())
    assert (hifi_run / "heads.png").read_bytes()[:4] == b"\x89PNG"


def test_reloaded_run_reproduces_the_eval_metrics(hifi_run, tiny_csv):
    """``predict``'s loader rebuilds the trained model exactly: same eval accuracy and loss."""
    model, tokenizer, run_config = cli.load_run(hifi_run)
    assert hifi_fast.is_patched(model)
    splits = load_data(train_path=str(tiny_csv), seed=0)
    data = encode(tokenizer, splits.eval.texts, splits.eval.labels, run_config["max_length"])
    again = evaluate(model, data, 3, splits.label_names)
    metrics = json.loads((hifi_run / "metrics.json").read_text())
    assert again["accuracy"] == metrics["accuracy"]
    assert again["loss"] == pytest.approx(metrics["eval_loss"], abs=1e-6)


def test_predict_text_and_input_file(hifi_run, tmp_path, capsys):
    capsys.readouterr()
    assert cli.main(["predict", "--checkpoint", str(hifi_run), "--text", "great movie", "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["label"] in ("negative", "neutral", "positive")
    assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert result["probabilities"][result["label"]] == max(result["probabilities"].values())

    texts = tmp_path / "texts.txt"
    texts.write_text("awful day\n\nlove it\nthe weather\n")
    assert cli.main(["predict", "--checkpoint", str(hifi_run), "--input", str(texts)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 3 and out[1].rstrip().endswith("love it")


@pytest.mark.parametrize("method", ["lora", "full", "frozen"])
def test_other_methods(method, tiny_model_dir, tiny_csv, tmp_path, hifi_run, capsys):
    out = tmp_path / method
    assert cli.main(finetune_argv(tiny_model_dir, tiny_csv, out, "--method", method)) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    hifi = json.loads((hifi_run / "metrics.json").read_text())
    assert metrics["method"] == method and metrics["selected_heads"] is None
    assert not (out / "selection.json").exists() and not (out / "heads.png").exists()
    total = metrics["total_params"]
    assert total == hifi["total_params"]
    if method == "full":
        assert metrics["trainable_params"] == total and (out / "model" / "config.json").is_file()
    elif method == "frozen":
        assert metrics["trainable_params"] == 32 * 3 + 3 < hifi["trainable_params"]
        assert (out / cli.FROZEN_WEIGHTS).is_file()
    else:
        assert 0 < metrics["trainable_params"] < total
        assert (out / "adapter_model.safetensors").is_file()
    assert metrics["checkpoint_mb"] > 0
    capsys.readouterr()
    assert cli.main(["predict", "--checkpoint", str(out), "--text", "sad movie", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["label"] in hifi["label_names"]


def test_frozen_method_leaves_the_backbone_untouched(tiny_model_dir, tiny_csv, tmp_path):
    out = tmp_path / "frozen"
    assert cli.main(finetune_argv(tiny_model_dir, tiny_csv, out, "--method", "frozen")) == 0
    model, _, _ = cli.load_run(out)
    base = BertForSequenceClassification.from_pretrained(tiny_model_dir)
    for (name, p), (_, q) in zip(model.named_parameters(), base.named_parameters()):
        if not name.startswith("classifier"):
            assert torch.equal(p, q), name


def test_compare_in_process(tiny_model_dir, tiny_csv, tmp_path):
    out = tmp_path / "cmp"
    argv = finetune_argv(tiny_model_dir, tiny_csv, out, "--no-save", "--epochs", "1")
    argv[0] = "compare"
    assert cli.main(argv + ["--in-process", "--methods", "hifi,frozen"]) == 0
    table = (out / "comparison.md").read_text()
    assert "| hifi |" in table and "| frozen |" in table
    rows = (out / "comparison.csv").read_text().strip().splitlines()
    assert rows[0].startswith("method,accuracy,macro_f1,trainable_params")
    assert [r.split(",")[0] for r in rows[1:]] == ["hifi", "frozen"]
    assert (out / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    assert not (out / "hifi" / "hifi_weights.safetensors").exists()  # --no-save


def test_compare_subprocess_arguments_round_trip(tiny_model_dir, tiny_csv, tmp_path):
    """The per-method subprocesses of ``compare`` get exactly the options given to it."""
    parser = cli.build_parser()
    argv = finetune_argv(tiny_model_dir, tiny_csv, tmp_path, "--score", "richness", "--no-save")
    argv[0] = "compare"
    args = parser.parse_args(argv)
    finetune = parser.subcommand_parsers["finetune"]
    forwarded = argv_for(finetune, args, {"method", "output_dir"})
    again = parser.parse_args(["finetune", "--output-dir", str(tmp_path), *forwarded])
    for key, value in vars(again).items():
        if key not in ("command", "method", "resume", "task", "prompt_column"):  # finetune-only options
            assert getattr(args, key) == value, key


def test_bad_inputs_exit_2_with_a_message(tiny_model_dir, tmp_path, capsys):
    missing = tmp_path / "missing.csv"
    assert cli.main(finetune_argv(tiny_model_dir, missing, tmp_path / "o")) == 2
    assert f"{missing}: file not found" in capsys.readouterr().err
    one = tmp_path / "one.csv"
    one.write_text("text,label\na,x\nb,x\n")
    assert cli.main(finetune_argv(tiny_model_dir, one, tmp_path / "o")) == 2
    assert "same label" in capsys.readouterr().err
    assert cli.main(["predict", "--checkpoint", str(tmp_path / "nothing"), "--text", "x"]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert cli.main(["predict", "--checkpoint", str(tmp_path)]) == 2
    assert "--text" in capsys.readouterr().err
    assert cli.main(finetune_argv(tiny_model_dir, one, tmp_path / "o", "--epochs", "0")) == 2
    assert "--epochs must be >= 1" in capsys.readouterr().err


def test_finetune_is_the_default_subcommand():
    assert normalise_argv([]) == ["finetune"]
    assert normalise_argv(["--epochs", "1"]) == ["finetune", "--epochs", "1"]
    assert normalise_argv(["predict", "--checkpoint", "x"])[0] == "predict"
    args = cli.build_parser().parse_args(normalise_argv([]))
    assert args.command == "finetune" and args.method == "hifi" and args.model is None and args.train is None


def test_module_entry_point_help():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "hifi_fast", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "finetune" in done.stdout and "compare" in done.stdout


def test_readme_command_shape():
    """The README's main-job command parses (bare ``hifi-fast finetune``)."""
    args = cli.build_parser().parse_args(shlex.split("finetune"))
    assert args.max_length == 64 and args.heads_per_layer == 2 and args.scoring_examples == 256


def test_cli_head_defaults_are_the_api_defaults():
    """One default: ``hifi-fast finetune`` selects heads as ``HiFiConfig()`` / ``patch(model)`` do."""
    args = cli.build_parser().parse_args(["finetune"])
    config = hifi_fast.HiFiConfig()
    assert (args.heads_per_layer, args.score) == (config.heads_per_layer, config.score) == (2, "random")


def test_help_names_every_subcommand_and_the_default_selection():
    parser = cli.build_parser()
    usage = parser.format_usage()
    assert all(name in usage for name in ("finetune", "compare", "predict", "generate"))
    finetune = " ".join(parser.subcommand_parsers["finetune"].format_help().split())  # unwrapped
    assert "random by default" in finetune and "--score pagerank" in finetune


@pytest.mark.parametrize("others, expected", [(0, 2), (1, 1), (5, 1)])
def test_default_threads_follow_the_tasks_running_now(monkeypatch, others, expected):
    from hifi_fast.cli import loading

    monkeypatch.setattr(loading.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(loading, "other_runnable_tasks", lambda: others)
    monkeypatch.setattr(loading, "default_threads", lambda: 2)
    assert loading.auto_threads() == (expected, f"2 cores, {others} other runnable task{'' if others == 1 else 's'} now")


def test_default_threads_are_not_capped_by_an_earlier_run(monkeypatch):
    """Runs in one process (compare, the selection study): a run under load sets 1 thread; the
    next, on an idle machine, goes back to torch's own count."""
    from hifi_fast.cli import loading

    initial = loading.default_threads()
    monkeypatch.setattr(loading.os, "sched_getaffinity", lambda pid: set(range(max(2, initial))))
    monkeypatch.setattr(loading, "other_runnable_tasks", lambda: 0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert loading.auto_threads()[0] == initial
    finally:
        torch.set_num_threads(threads)


def test_other_runnable_tasks_reads_proc():
    from hifi_fast.cli.loading import other_runnable_tasks

    if not os.path.exists("/proc/loadavg"):
        pytest.skip("no /proc here")
    assert 0 <= other_runnable_tasks() < 10_000


def test_finetune_with_random_heads_skips_the_scoring_pass(tiny_model_dir, tiny_csv, tmp_path):
    out = tmp_path / "random"  # the default score
    assert cli.main(finetune_argv(tiny_model_dir, tiny_csv, out, "--heads-per-layer", "2",
                                  "--seed", "3", "--epochs", "1", "--no-save")) == 0
    assert json.loads((out / "run_config.json").read_text())["hifi_config"]["score"] == "random"
    selection = hifi_fast.HeadSelection.from_json((out / "selection.json").read_text())
    expected = hifi_fast.select_heads(random_scores(num_layers=2, num_heads=4),
                                      hifi_fast.HiFiConfig(heads_per_layer=2, score="random", seed=3))
    assert selection == expected and selection.scores is None
    assert not (out / "heads.png").exists()
    assert json.loads((out / "metrics.json").read_text())["scoring_time_s"] < 0.05


@pytest.mark.parametrize("score", ["importance", "gradient"])
def test_finetune_with_a_task_aware_score(score, tiny_model_dir, tiny_csv, tmp_path):
    out = tmp_path / score
    assert cli.main(finetune_argv(tiny_model_dir, tiny_csv, out, "--score", score, "--heads-per-layer", "1",
                                  "--epochs", "1", "--no-save")) == 0
    selection = json.loads((out / "selection.json").read_text())
    assert selection["scores"][score] is not None
    assert json.loads((out / "run_config.json").read_text())["hifi_config"]["score"] == score
    initial = tmp_path / "initial"
    assert cli.main(finetune_argv(tiny_model_dir, tiny_csv, initial, "--score", score, "--heads-per-layer",
                                  "1", "--task-head", "initial", "--epochs", "1", "--no-save")) == 0
    assert json.loads((initial / "run_config.json").read_text())["hifi_config"]["keep_warmed_head"] is False


@pytest.mark.parametrize("env, offline", [(None, True), ("1", True), ("0", False)])
def test_the_command_line_stays_offline_unless_told(env, offline, monkeypatch, tmp_path):
    """huggingface_hub reads HF_HUB_OFFLINE when hifi_fast imports transformers, before the CLI sets
    its default: ``main`` makes the default hold (a model name was tried on the network first)."""
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", not offline)
    if env is None:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", env)
    assert cli.main(["predict", "--checkpoint", str(tmp_path / "no-run"), "--text", "x"]) == 2
    assert hub.HF_HUB_OFFLINE is offline


@pytest.mark.parametrize("flag, value, message", [
    ("--lr", "nan", "--lr must be a finite number > 0, got nan"),
    ("--lr", "inf", "--lr must be a finite number > 0, got inf"),
    ("--weight-decay", "-1", "--weight-decay must be a finite number >= 0, got -1.0"),
    ("--warmup-ratio", "nan", "--warmup-ratio must be between 0 and 1, got nan"),
    ("--warmup-ratio", "5", "--warmup-ratio must be between 0 and 1, got 5.0"),
    ("--damping", "1.5", r"--damping must be in \[0, 1\), got 1.5"),
    ("--lora-alpha", "-16", "--lora-alpha must be a finite number > 0, got -16.0"),
])
@pytest.mark.parametrize("command", ["finetune", "compare"])
def test_bad_numbers_are_refused_before_any_work(command, flag, value, message, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main([command, "--output-dir", str(out), flag, value]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists()  # refused before a run folder exists


@pytest.mark.parametrize("flag, value, message", [("--batch-size", "0", "--batch-size must be >= 1, got 0"),
                                                  ("--max-length", "1", "--max-length must be >= 2, got 1")])
def test_predict_refuses_bad_sizes(flag, value, message, tmp_path, capsys):
    assert cli.main(["predict", "--checkpoint", str(tmp_path), "--text", "x", flag, value]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("methods, message", [("hifi,hifi", "names a method twice"), ("", "--methods: empty; choose from"),
                                              ("hifi,best", r"--methods: unknown \['best'\]")])
def test_compare_refuses_bad_method_lists(methods, message, tmp_path, capsys):
    assert cli.main(["compare", "--output-dir", str(tmp_path / "cmp"), "--methods", methods]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "cmp").exists()


@pytest.mark.parametrize("base, message", [
    ("some-org/some-model", "cannot load a tokenizer from some-org/some-model"),  # a hub name: tried (cache only)
    ("/no/such/model/dir", "the base model /no/such/model/dir recorded in .* is not there any more; pass --model DIR"),
])
def test_predict_tries_a_recorded_hub_name_and_refuses_a_vanished_path(base, message, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run_config.json").write_text(json.dumps({"method": "frozen", "base_model_name_or_path": base}))
    assert cli.main(["predict", "--checkpoint", str(run), "--text", "x"]) == 2
    assert re.search(message, capsys.readouterr().err)
