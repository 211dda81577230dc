"""save/load/unpatch (DESIGN §2 "Checkpoints"): bit-exact reload, refusal of other base models with
nothing written, and a merged model that round-trips through save_pretrained/from_pretrained."""
import copy
import json
import os
import stat

import torch

import hifi_fast
from hifi_fast.storing.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from conftest import tiny_batch, tiny_model, trained_model

SELECTION = {"bert": {0: [1], 2: [0, 3]}, "gpt2": {1: [0, 2]}, "llama": {0: [1, 2], 2: [5]}}


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_save_load_reproduces_logits_bit_exactly(family, tmp_path):
    model = trained_model(family, SELECTION[family])
    hifi_fast.save(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == [CONFIG_NAME, WEIGHTS_NAME]
    fresh = hifi_fast.load(tiny_model(family), tmp_path)
    batch = tiny_batch(seed=7)
    assert torch.equal(_logits(fresh, batch), _logits(model, batch))
    assert fresh.hifi_state.selection.heads == SELECTION[family]
    assert hifi_fast.count_parameters(fresh) == hifi_fast.count_parameters(model)


def test_checkpoint_is_small_and_holds_only_slices_and_task_head(tmp_path):
    model = trained_model("bert", SELECTION["bert"])
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


def test_checkpoint_files_are_as_readable_as_new_files(tmp_path):
    """``open`` permissions under the process's umask (a temporary file's are owner-only)."""
    umask = os.umask(0o022)
    os.umask(umask)
    hifi_fast.save(trained_model("bert", SELECTION["bert"]), tmp_path)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_save_flushes_each_file_and_then_its_folder(tmp_path, monkeypatch):
    """A file's data before its rename, the folder's entry after it: both survive a power cut."""
    synced, fsync = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(stat.S_ISDIR(os.fstat(fd).st_mode)), fsync(fd)))
    hifi_fast.save(trained_model("bert", SELECTION["bert"]), tmp_path)
    assert synced == [False, True, False, True]  # weights, folder, config, folder


def test_checkpoint_holds_slices_and_task_head_whatever_requires_grad_says_since(tmp_path):
    """Freezing the task head, or unfreezing a LayerNorm, after ``patch`` changes what the optimizer
    sees, not what a checkpoint of the patch holds: it still loads."""
    model = trained_model("bert", SELECTION["bert"])
    model.classifier.requires_grad_(False)
    model.bert.embeddings.LayerNorm.requires_grad_(True)
    hifi_fast.save(model, tmp_path)
    fresh = hifi_fast.load(tiny_model("bert"), tmp_path)
    batch = tiny_batch(seed=7)
    assert torch.equal(_logits(fresh, batch), _logits(model, batch))


def test_unpatched_model_round_trips_through_save_pretrained(family, tmp_path):
    model = trained_model(family, SELECTION[family])
    batch = tiny_batch(seed=3)
    expected = _logits(model, batch)
    plain = hifi_fast.unpatch(copy.deepcopy(model))
    assert torch.equal(_logits(plain, batch), expected)
    plain.save_pretrained(tmp_path)
    reloaded = type(plain).from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_logits(reloaded, batch), expected, rtol=0, atol=1e-6)
