"""``hifi_fast.swap``: one base model, many checkpoints, switched in place. Every swap must equal
loading the checkpoint into a fresh base model and unpatching it, bit for bit; ``None`` must give
the base model back bit for bit; every refusal must leave the model (and its swap state) as it was."""
import contextlib
import os

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import hifi_fast
from hifi_fast.storing.checkpoint import CONFIG_NAME, WEIGHTS_NAME, CheckpointMismatchError, expected_tensors
from hifi_fast.storing.swap import SWAP_ATTR, SwapStateError
from conftest import tiny_batch, tiny_model, trained_model
from test_errors import unchanged as unchanged_model

# Head 2 of layer 0 is trained by both tasks (for Llama also its key/value group 0).
SELECTION_A = {0: [1, 2], 2: [0]}
SELECTION_B = {0: [2, 3], 1: [1]}
TASK_HEAD = {"bert": "classifier", "gpt2": "score", "llama": "score"}


def _save_task(directory, family, selection, salt, seed=0, num_labels=3):
    """A checkpoint of ``selection`` whose values differ from every other task's (``salt``)."""
    model = trained_model(family, selection, seed=seed) if num_labels == 3 else hifi_fast.patch(
        tiny_model(family, seed=seed, num_labels=num_labels), hifi_fast.HeadSelection(selection))
    generator = torch.Generator().manual_seed(salt)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    hifi_fast.save(model, directory)
    return directory


def _tasks(directory, family):
    return {
        "a": _save_task(directory / "a", family, SELECTION_A, salt=1),
        "b": _save_task(directory / "b", family, SELECTION_B, salt=2),
    }


@pytest.fixture
def tasks(family, tmp_path):
    """Checkpoints A and B of each family's tiny model."""
    return _tasks(tmp_path, family)


@pytest.fixture
def bert_tasks(tmp_path):
    return _tasks(tmp_path, "bert")


def _reference(family, directory):
    """The model ``swap`` must produce: the checkpoint loaded into a fresh base model, unpatched."""
    return hifi_fast.unpatch(hifi_fast.load(tiny_model(family), directory))


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _assert_same(model, expected: dict[str, torch.Tensor]):
    state = model.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


def _assert_plain(model):
    assert not hifi_fast.is_patched(model)
    assert not any(".hifi_" in name for name, _ in model.named_parameters())
    assert all(type(m).__name__ not in ("HiFiLinear", "HiFiConv1D") for m in model.modules())


@contextlib.contextmanager
def unchanged(model):
    """The model's weights, requires_grad, patch state and current task are as they were."""
    state = getattr(model, SWAP_ATTR, None)
    current = None if state is None else state.current
    with unchanged_model(model):
        yield
    assert getattr(model, SWAP_ATTR, None) is state
    assert state is None or state.current is current


def test_swaps_equal_loading_each_checkpoint_into_a_fresh_model(family, tasks):
    model = tiny_model(family)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    batch = tiny_batch(seed=5)
    base_logits = _logits(model, batch)
    references = {name: _reference(family, path) for name, path in tasks.items()}
    for name in ["a", "b", "a", "b"]:
        assert hifi_fast.swap(model, tasks[name]) is model
        _assert_plain(model)
        _assert_same(model, references[name].state_dict())
        assert torch.equal(_logits(model, batch), _logits(references[name], batch))
        assert model.hifi_swap_state.current_path == os.path.abspath(tasks[name])
    hifi_fast.swap(model, None)
    _assert_same(model, base)
    assert torch.equal(_logits(model, batch), base_logits)
    assert model.hifi_swap_state.current_path is None
    hifi_fast.swap(model, tasks["b"])  # from the base model again, from the cache
    _assert_same(model, references["b"].state_dict())


def test_overlapping_heads_take_the_new_task_values_and_restore_the_true_base(bert_tasks):
    model = tiny_model("bert")
    query = model.bert.encoder.layer[0].attention.self.query
    base_weight, base_bias = query.weight.detach().clone(), query.bias.detach().clone()
    b_slices = load_file(str(bert_tasks["b"] / WEIGHTS_NAME))
    hifi_fast.swap(model, bert_tasks["a"])
    hifi_fast.swap(model, bert_tasks["b"])  # B's base values are captured after A's are undone

    def rows(heads):  # head_dim 8
        return torch.cat([torch.arange(h * 8, h * 8 + 8) for h in heads])

    assert torch.equal(query.weight[rows([2, 3])], b_slices["bert.encoder.layer.0.attention.self.query.hifi_weight"])
    assert torch.equal(query.bias[rows([2, 3])], b_slices["bert.encoder.layer.0.attention.self.query.hifi_bias"])
    assert torch.equal(query.weight[rows([0, 1])], base_weight[rows([0, 1])])  # head 1 was A's only
    hifi_fast.swap(model, None)
    assert torch.equal(query.weight, base_weight) and torch.equal(query.bias, base_bias)


def test_memory_per_task_is_its_slices_and_task_head(family, tasks):
    model = hifi_fast.swap(tiny_model(family), tasks["a"])
    task = model.hifi_swap_state.current
    checkpoint_bytes = sum(t.nbytes for t in load_file(str(tasks["a"] / WEIGHTS_NAME)).values())
    assert task.value_bytes == task.base_bytes == checkpoint_bytes
    hifi_fast.swap(model, tasks["b"])
    assert model.hifi_swap_state.stored_bytes() == 2 * checkpoint_bytes + 2 * model.hifi_swap_state.current.value_bytes
    hifi_fast.swap(model, tasks["a"], cache=False)  # read again, kept only while current
    assert set(model.hifi_swap_state.tasks) == {os.path.abspath(tasks["b"])}


def test_expected_tensors_are_what_patch_makes_trainable(family):
    model = tiny_model(family)
    selection = hifi_fast.HeadSelection(SELECTION_A)
    expected = expected_tensors(model, selection, None)
    trainable = {n: p for n, p in hifi_fast.patch(tiny_model(family), selection).named_parameters() if p.requires_grad}
    assert {k: (v.shape, v.dtype) for k, v in expected.items()} == {k: (v.shape, v.dtype) for k, v in trainable.items()}


def test_fp32_master_slices_of_a_bf16_model(tmp_path):
    model = hifi_fast.patch(tiny_model("bert", dtype=torch.bfloat16), hifi_fast.HeadSelection(SELECTION_A), master_dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(1e-3 * torch.randn(param.shape, generator=torch.Generator().manual_seed(3)))
    hifi_fast.save(model, tmp_path)
    reference = hifi_fast.unpatch(hifi_fast.load(tiny_model("bert", dtype=torch.bfloat16), tmp_path))
    swapped = hifi_fast.swap(tiny_model("bert", dtype=torch.bfloat16), tmp_path)
    _assert_same(swapped, reference.state_dict())


def test_a_checkpoint_rewritten_on_disk_is_read_again(bert_tasks):
    model = hifi_fast.swap(tiny_model("bert"), bert_tasks["a"])
    hifi_fast.swap(model, None)
    _save_task(bert_tasks["a"], "bert", SELECTION_B, salt=7)
    hifi_fast.swap(model, bert_tasks["a"])
    _assert_same(model, _reference("bert", bert_tasks["a"]).state_dict())


def test_a_cached_task_does_not_depend_on_its_file(bert_tasks):
    """The kept values are copies, not views mapped from the file (which may be rewritten in place
    without its size or time changing)."""
    reference = _reference("bert", bert_tasks["a"]).state_dict()
    model = hifi_fast.swap(hifi_fast.swap(tiny_model("bert"), bert_tasks["a"]), None)
    path = bert_tasks["a"] / WEIGHTS_NAME
    before = os.stat(path)
    with open(path, "r+b") as handle:
        handle.write(bytes(before.st_size))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    _assert_same(hifi_fast.swap(model, bert_tasks["a"]), reference)


def test_a_checkpoint_with_another_task_head_module_set(tmp_path, bert_tasks):
    """The base fingerprint excluding other modules is computed on the base values, not on the
    current task's."""
    model = hifi_fast.patch(tiny_model("bert"), hifi_fast.HeadSelection({1: [0]}), modules_to_save=["classifier", "bert.pooler"])
    with torch.no_grad():
        model.bert.pooler.dense.bias.add_(1.0)
    hifi_fast.save(model, tmp_path / "pooler")
    swapped = hifi_fast.swap(hifi_fast.swap(tiny_model("bert"), bert_tasks["a"]), tmp_path / "pooler")
    _assert_same(swapped, _reference("bert", tmp_path / "pooler").state_dict())
    assert len(swapped.hifi_swap_state.fingerprints) == 2


def test_swap_to_base_of_a_never_swapped_model_is_a_no_op():
    model = tiny_model("gpt2")
    with unchanged(model):
        assert hifi_fast.swap(model, None) is model


# --- refusals: nothing changes -------------------------------------------------------------------

def _refused(model, checkpoint, message, error=CheckpointMismatchError):
    with unchanged(model), pytest.raises(error, match=message):
        hifi_fast.swap(model, checkpoint)


def test_refuses_a_checkpoint_of_another_base_model(family, tasks, tmp_path):
    other = _save_task(tmp_path / "other", family, SELECTION_B, salt=2, seed=1)
    _refused(tiny_model(family, seed=1), tasks["a"], "another base model.*weights fingerprint mismatch")
    model = hifi_fast.swap(tiny_model(family), tasks["a"])  # the kept fingerprint is the base's, not A's
    _refused(model, other, "another base model.*weights fingerprint mismatch")
    _refused(tiny_model(family).to(torch.float64), tasks["a"], "dtype: checkpoint 'float32', model 'float64'")
    renamed = tiny_model(family)
    renamed.config._name_or_path = "someone/else"
    _refused(renamed, tasks["a"], "base_model_name_or_path: checkpoint '', model 'someone/else'")
    hifi_fast.swap(renamed, tasks["a"], check_name=False)


def test_refuses_a_task_head_that_does_not_fit(family, tasks, tmp_path):
    head = TASK_HEAD[family]
    _refused(tiny_model(family, num_labels=5), tasks["a"], rf"{head}.weight is \(3, \d+\) torch.float32, the model needs \(5, \d+\)")
    five = _save_task(tmp_path / "five", family, SELECTION_B, salt=3, num_labels=5)
    _refused(hifi_fast.swap(tiny_model(family), tasks["a"]), five, rf"{head}.weight is \(5, \d+\) torch.float32, the model needs \(3, \d+\)")


def test_refuses_a_patched_model(bert_tasks):
    _refused(trained_model("bert", SELECTION_A), bert_tasks["a"], "patched for training .*unpatch", ValueError)
    model = hifi_fast.swap(tiny_model("bert"), bert_tasks["a"])
    hifi_fast.patch(model, hifi_fast.HeadSelection({1: [0]}))
    _refused(model, bert_tasks["b"], "patched for training", ValueError)
    _refused(model, None, "patched for training", ValueError)


def test_refuses_missing_and_damaged_checkpoints(bert_tasks, tmp_path):
    model = hifi_fast.swap(tiny_model("bert"), bert_tasks["a"])
    _refused(model, tmp_path / "nowhere", "hifi_config.json is missing", FileNotFoundError)
    weights = (bert_tasks["b"] / WEIGHTS_NAME).read_bytes()
    (bert_tasks["b"] / WEIGHTS_NAME).write_bytes(weights[: len(weights) // 2])
    _refused(model, bert_tasks["b"], r"not the weights file .* \(SHA-256 differs\)")
    (bert_tasks["b"] / WEIGHTS_NAME).unlink()
    _refused(model, bert_tasks["b"], "hifi_weights.safetensors is missing", FileNotFoundError)
    (bert_tasks["b"] / CONFIG_NAME).write_text("{not json")
    _refused(model, bert_tasks["b"], "hifi_config.json is not valid JSON")
    _refused(model, 3, "checkpoint must be a directory written by hifi_fast.save", TypeError)
    # A cached task whose files were damaged after it was read is read (and refused) again.
    (bert_tasks["a"] / WEIGHTS_NAME).write_bytes(b"damaged")
    hifi_fast.swap(model, None)
    _refused(model, bert_tasks["a"], r"SHA-256 differs")


def test_refuses_a_model_changed_outside_swap(bert_tasks):
    model = hifi_fast.swap(tiny_model("bert"), bert_tasks["a"])
    with torch.no_grad():
        model.bert.encoder.layer[1].output.dense.weight.mul_(2)
    _refused(model, bert_tasks["b"], r"bert.encoder.layer.1.output.dense.weight changed outside hifi_fast.swap", SwapStateError)
    _refused(model, None, "changed outside hifi_fast.swap", SwapStateError)
    del model.hifi_swap_state  # take the model as it is as the new base model
    _refused(model, bert_tasks["b"], "weights fingerprint mismatch")


def test_the_swapped_model_is_a_plain_model_to_train_or_save(bert_tasks, tmp_path):
    model = hifi_fast.swap(tiny_model("bert"), bert_tasks["a"])
    assert all(isinstance(m, nn.Linear) and type(m) is nn.Linear for m in [model.bert.encoder.layer[0].attention.self.query])
    model.save_pretrained(tmp_path / "plain")
    reloaded = type(model).from_pretrained(tmp_path / "plain").eval()
    batch = tiny_batch(seed=2)
    torch.testing.assert_close(_logits(reloaded, batch), _logits(model, batch), rtol=0, atol=1e-6)
