"""The base-weights fingerprint (``patching.weights_fingerprint``): computed on each parameter's own
device from two integer checksums (no copy of the model to the host, the same on every device),
sensitive to any one changed value, and older (version 1) checkpoints still load."""
import json

import pytest
import torch

import hifi_fast
import hifi_fast.tuning.patching as patching
from hifi_fast.storing.checkpoint import CONFIG_NAME, CheckpointMismatchError

from conftest import tiny_model, trained_model


def test_version_2_hashes_checksums_independent_of_chunking(monkeypatch):
    model = tiny_model("llama")
    whole = patching.weights_fingerprint(model)
    assert whole.startswith("v2:") and patching.fingerprint_version(whole) == 2
    monkeypatch.setattr(patching, "_CHECKSUM_CHUNK", 7)  # many chunks, none aligned with a row
    assert patching.weights_fingerprint(model) == whole


def test_checksums_are_exact_integer_sums():
    values = torch.tensor([1.5, -2.0, 3.25], dtype=torch.float32)
    bits = values.view(torch.int32).to(torch.int64)
    want = [int(bits.sum()), int((bits * torch.arange(1, 4)).sum())]
    assert patching._checksums(values).tolist() == want


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_changed_value_changes_the_fingerprint(dtype):
    model = tiny_model("bert").to(dtype)
    before = patching.weights_fingerprint(model)
    weight = model.bert.encoder.layer[1].attention.self.key.weight
    with torch.no_grad():  # one unit in the last place
        weight.view({4: torch.int32, 2: torch.int16}[weight.element_size()])[5, 7] += 1
    assert patching.weights_fingerprint(model) != before
    assert patching.weights_fingerprint(model, ["bert.encoder"]) == patching.weights_fingerprint(
        tiny_model("bert").to(dtype), ["bert.encoder"])  # excluded modules take no part


def test_no_parameter_is_copied_to_the_host(monkeypatch):
    cpu = torch.Tensor.cpu

    def only_checksums(self, *args, **kwargs):
        assert self.numel() <= 2, f"a tensor of {self.numel()} elements was copied to the host"
        return cpu(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "cpu", only_checksums)
    assert patching.weights_fingerprint(tiny_model("gpt2")).startswith("v2:")


def test_version_1_checkpoints_still_load_and_are_still_checked(tmp_path):
    model = trained_model("bert", {0: [1]})
    hifi_fast.save(model, tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    base = tiny_model("bert")
    config["base_fingerprint"] = patching.weights_fingerprint(base, config["modules_to_save"], version=1)
    assert patching.fingerprint_version(config["base_fingerprint"]) == 1
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    loaded = hifi_fast.load(tiny_model("bert"), tmp_path).eval()
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8]])}
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model.eval()(**batch).logits)
    with pytest.raises(CheckpointMismatchError, match="weights fingerprint mismatch"):
        hifi_fast.load(tiny_model("bert", seed=1), tmp_path)
    with pytest.raises(ValueError, match="unknown weights fingerprint version 3"):
        patching.weights_fingerprint(base, version=3)
