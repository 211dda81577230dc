"""save/load/unpatch (DESIGN §2 "Checkpoints"): bit-exact reload, refusal of other base models with
nothing written, and a merged model that round-trips through save_pretrained/from_pretrained."""
import copy
import json
import os

import pytest
import torch

import hifi_fast
from hifi_fast.checkpoint import CONFIG_NAME, WEIGHTS_NAME, CheckpointMismatchError
from conftest import tiny_batch, tiny_model

SELECTION = {"bert": {0: [1], 2: [0, 3]}, "gpt2": {1: [0, 2]}, "llama": {0: [1, 2], 2: [5]}}


def _trained(family, seed=0):
    model = hifi_fast.patch(tiny_model(family, seed=seed), hifi_fast.HeadSelection(SELECTION[family]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = tiny_batch()
    model(**batch).loss.backward()
    opt.step()
    return model


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_save_load_reproduces_logits_bit_exactly(family, tmp_path):
    model = _trained(family)
    hifi_fast.save(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == [CONFIG_NAME, WEIGHTS_NAME]
    fresh = hifi_fast.load(tiny_model(family), tmp_path)
    batch = tiny_batch(seed=7)
    assert torch.equal(_logits(fresh, batch), _logits(model, batch))
    assert fresh.hifi_state.selection.heads == SELECTION[family]
    assert hifi_fast.count_parameters(fresh) == hifi_fast.count_parameters(model)


def test_checkpoint_is_small_and_holds_only_slices_and_task_head(tmp_path):
    model = _trained("bert")
    hifi_fast.save(model, tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / WEIGHTS_NAME), framework="pt") as f:
        keys = set(f.keys())
    assert keys == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".hifi_" in k or k.startswith("classifier.") for k in keys)
    trainable, total = hifi_fast.count_parameters(model)
    assert os.path.getsize(tmp_path / WEIGHTS_NAME) < 4 * trainable + 4096 < 4 * total
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["selection"]["heads"] == {"0": [1], "2": [0, 3]} and config["dtype"] == "float32"


def _refused(model, directory, message):
    before = _snapshot(model)
    with pytest.raises(CheckpointMismatchError, match=message):
        hifi_fast.load(model, directory)
    assert not hifi_fast.is_patched(model) and _same(before, _snapshot(model))


def test_load_refuses_other_base_models_and_changes_nothing(tmp_path):
    hifi_fast.save(_trained("bert"), tmp_path)
    files = {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)}
    _refused(tiny_model("gpt2"), tmp_path, "model_type: checkpoint 'bert', model 'gpt2'")
    _refused(tiny_model("bert", seed=1), tmp_path, "weights fingerprint mismatch")
    _refused(tiny_model("bert").to(torch.float64), tmp_path, "dtype: checkpoint 'float32', model 'float64'")
    renamed = tiny_model("bert")
    renamed.config._name_or_path = "someone/else"
    _refused(renamed, tmp_path, "base_model_name_or_path")
    hifi_fast.load(renamed, tmp_path, check_name=False)
    from transformers import BertConfig, BertForSequenceClassification

    bigger = BertForSequenceClassification(BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=48))
    _refused(bigger, tmp_path, "num_layers: checkpoint 3, model 4")
    assert files == {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)}


def test_load_refuses_damaged_checkpoints(tmp_path):
    hifi_fast.save(_trained("llama"), tmp_path)
    weights = (tmp_path / WEIGHTS_NAME).read_bytes()
    (tmp_path / WEIGHTS_NAME).write_bytes(weights[: len(weights) // 2])
    _refused(tiny_model("llama"), tmp_path, "not a readable safetensors file")
    (tmp_path / CONFIG_NAME).write_text("{not json")
    _refused(tiny_model("llama"), tmp_path, "not valid JSON")
    with pytest.raises(FileNotFoundError, match="hifi_config.json is missing"):
        hifi_fast.load(tiny_model("llama"), tmp_path / "nowhere")


def test_selection_that_does_not_fit_the_weights_file_is_refused(tmp_path):
    hifi_fast.save(_trained("bert"), tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    config["selection"]["heads"] = {"0": [1, 2], "2": [0, 3]}
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    _refused(tiny_model("bert"), tmp_path, r"query.hifi_weight is \(8, 32\) torch.float32, the model needs \(16, 32\)")


def test_save_refuses_unpatched_and_load_refuses_patched(tmp_path):
    with pytest.raises(ValueError, match="not patched"):
        hifi_fast.save(tiny_model("bert"), tmp_path)
    assert not (tmp_path / CONFIG_NAME).exists()
    model = _trained("bert")
    hifi_fast.save(model, tmp_path)
    with pytest.raises(ValueError, match="already patched"):
        hifi_fast.load(model, tmp_path)


def test_unpatched_model_round_trips_through_save_pretrained(family, tmp_path):
    model = _trained(family)
    batch = tiny_batch(seed=3)
    expected = _logits(model, batch)
    plain = hifi_fast.unpatch(copy.deepcopy(model))
    assert torch.equal(_logits(plain, batch), expected)
    plain.save_pretrained(tmp_path)
    reloaded = type(plain).from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_logits(reloaded, batch), expected, rtol=0, atol=1e-6)
