"""Every bad input gets a clear error naming what is wrong, and nothing is changed: not the model
(weights, requires_grad, patch state) and not a checkpoint already on disk."""
import contextlib
import json
import os
import re
from pathlib import Path

import pytest
import torch

import hifi_fast
from hifi_fast.storing.checkpoint import CONFIG_NAME, WEIGHTS_NAME, CheckpointMismatchError
from conftest import random_scores, tiny_batch, tiny_model, trained_model

SELECTION = {0: [1], 2: [0, 3]}


@contextlib.contextmanager
def unchanged(model, directory=None):
    """Assert that the block leaves ``model`` (and the files in ``directory``) exactly as they were."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    patched = hifi_fast.is_patched(model)
    directory = directory if directory is not None and directory.is_dir() else None
    files = {f: (directory / f).read_bytes() for f in os.listdir(directory)} if directory else None
    yield
    after = model.state_dict()
    assert state.keys() == after.keys()
    for key in state:
        torch.testing.assert_close(after[key], state[key], rtol=0, atol=0, equal_nan=True, msg=key)
    assert grads == {n: p.requires_grad for n, p in model.named_parameters()}
    assert hifi_fast.is_patched(model) == patched
    if directory:
        assert files == {f: (directory / f).read_bytes() for f in os.listdir(directory)}


# --- scoring -------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "batches, message",
    [
        ([], "scoring set is empty"),
        ([{"input_ids": torch.ones(2, 5, dtype=torch.long), "attention_mask": torch.zeros(2, 5, dtype=torch.long)}], "batch 0 is all padding"),
        ([{"input_ids": torch.ones(2, 5, dtype=torch.long), "attention_mask": torch.tensor([[1] * 5, [0] * 5])}], r"examples \[1\] are all padding"),
        ([{"attention_mask": torch.ones(2, 5)}], "must be a dict with 'input_ids'"),
        ([{"input_ids": torch.ones(5, dtype=torch.long)}], r"must be integer token ids \[batch, tokens\], got \(5,\)"),
        ([{"input_ids": torch.ones(2, 5)}], r"must be integer token ids \[batch, tokens\], got \(2, 5\) torch.float32"),
        ([{"input_ids": torch.ones(2, 5, dtype=torch.long), "attention_mask": torch.ones(2, 1, 5)}],
         r"attention_mask must have input_ids' shape \(2, 5\), got \(2, 1, 5\)"),
        ([{"input_ids": torch.ones(2, 5, dtype=torch.long), "position_ids": torch.arange(5)}],
         r"position_ids must have input_ids' shape \(2, 5\), got \(5,\)"),
    ],
)
def test_bad_scoring_input(batches, message):
    model = tiny_model("bert").train()
    with unchanged(model), pytest.raises((ValueError, TypeError), match=message):
        hifi_fast.score_heads(model, batches)
    assert model.training and not any(m._forward_pre_hooks for m in model.modules())


def test_non_finite_activations_are_reported_by_layer():
    model = tiny_model("bert")
    with torch.no_grad():
        model.bert.encoder.layer[1].attention.self.value.bias.fill_(float("nan"))
    with unchanged(model), pytest.raises(ValueError, match=r"non-finite \(NaN/inf\) attention outputs in layers \[1, 2\]"):
        hifi_fast.score_heads(model, [tiny_batch()])


def test_unsupported_model_lists_supported_types():
    from transformers import NystromformerConfig, NystromformerForSequenceClassification

    model = NystromformerForSequenceClassification(NystromformerConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
    message = (r"does not support NystromformerForSequenceClassification \(model_type='nystromformer'\); supported "
               r"model types: bert, roberta.*; the general adapter, tried for other model types, refused it: .*conv")
    with unchanged(model):
        for call in (lambda: hifi_fast.score_heads(model, [tiny_batch()]), lambda: hifi_fast.patch(model, hifi_fast.HeadSelection({0: [0]}))):
            with pytest.raises(hifi_fast.UnsupportedModelError, match=message):
                call()


def _cross_attention_decoder(family: str):
    from transformers import BertConfig, BertLMHeadModel, GPT2Config, GPT2LMHeadModel

    if family == "bert":
        return BertLMHeadModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                          intermediate_size=32, is_decoder=True, add_cross_attention=True))
    return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, add_cross_attention=True))


@pytest.mark.parametrize("family, where", [("bert", "bert.encoder.layer.0.crossattention"),
                                           ("gpt2", "transformer.h.0.crossattention")])
def test_cross_attention_the_adapter_does_not_map_is_refused(family, where):
    """BERT/GPT-2 decoders built with add_cross_attention=True: their cross-attention would be
    neither scored nor trained, so they are refused rather than patched in part."""
    model = _cross_attention_decoder(family)
    message = rf"has cross-attention layers \('{re.escape(where)}'; add_cross_attention=True\).*encoder-decoder families"
    with unchanged(model):
        for call in (lambda: hifi_fast.score_heads(model, [tiny_batch()]), lambda: hifi_fast.patch(model)):
            with pytest.raises(hifi_fast.UnsupportedModelError, match=message):
                call()


# --- configuration and selection -----------------------------------------------------------------

@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"heads_per_layer": 0}, "heads_per_layer must be an integer >= 1"),
        ({"heads_per_layer": 2, "trainable_param_budget": 10}, "not both"),
        ({"score": "entropy"}, "score='entropy' is not one of"),
        ({"selection": "best"}, "selection='best' is not one of"),
        ({"damping": 1.0}, "damping must be in"),
        ({"num_scoring_examples": 0}, "num_scoring_examples must be"),
        ({"master_dtype": "fp32"}, "master_dtype must be a floating torch.dtype"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        hifi_fast.HiFiConfig(**kwargs)


def test_k_beyond_the_model_or_budget_is_refused():
    with pytest.raises(ValueError, match="heads_per_layer=6 exceeds the model's 5 heads"):
        hifi_fast.select_heads(random_scores(), hifi_fast.HiFiConfig(score="pagerank", heads_per_layer=6))
    with pytest.raises(ValueError, match=r"trainable_param_budget=399 is below one head per layer \(4 layers x 100"):
        hifi_fast.select_heads(random_scores(), hifi_fast.HiFiConfig(score="pagerank", trainable_param_budget=399))
    with pytest.raises(ValueError, match=r"trainable_param_budget needs the parameters one head costs.*params_per_head=0"):
        hifi_fast.select_heads(random_scores(params_per_head=0), hifi_fast.HiFiConfig(score="pagerank", trainable_param_budget=10**6))


@pytest.mark.parametrize(
    "heads, message",
    [({0: [1, 1]}, "lists a head twice"), ({-1: [0]}, "layer index must be"), ({0: [-2]}, "head index"), ({0: []}, "selects no head")],
)
def test_bad_head_selection(heads, message):
    with pytest.raises(ValueError, match=message):
        hifi_fast.HeadSelection(heads)


@pytest.mark.parametrize("text, message", [("{", "not valid JSON"), ('{"layers": {}}', "expected an object with a 'heads' entry")])
def test_bad_selection_json(text, message):
    with pytest.raises(ValueError, match=message):
        hifi_fast.HeadSelection.from_json(text)


# --- patch / unpatch -----------------------------------------------------------------------------

@pytest.mark.parametrize(
    "selection, message",
    [
        ({5: [0]}, r"layer 5, but the model has layers 0\.\.2"),
        ({0: [0, 4]}, r"heads \[4\] of layer 0, but the model has heads 0\.\.3"),
    ],
)
def test_out_of_range_selection(selection, message):
    model = tiny_model("bert")
    with unchanged(model), pytest.raises(ValueError, match=message):
        hifi_fast.patch(model, hifi_fast.HeadSelection(selection))


def test_patch_twice_and_unpatch_unpatched():
    model = tiny_model("gpt2")
    with unchanged(model), pytest.raises(ValueError, match="not patched by hifi_fast; nothing to unpatch"):
        hifi_fast.unpatch(model)
    hifi_fast.patch(model, hifi_fast.HeadSelection({0: [0]}))
    with unchanged(model), pytest.raises(ValueError, match="already patched by hifi_fast; call hifi_fast.unpatch"):
        hifi_fast.patch(model, hifi_fast.HeadSelection({1: [0]}))
    assert model.hifi_state.selection.heads == {0: [0]}


@pytest.mark.parametrize(
    "args, kwargs, error, message",
    [
        (({0: [1]},), {}, TypeError, "selection must be a HeadSelection or HiFiConfig, got dict"),
        ((hifi_fast.HiFiConfig(score="pagerank"),), {}, ValueError, "score=.pagerank. needs scoring batches .batches=...."),
        ((hifi_fast.HeadSelection({0: [1]}),), {"modules_to_save": ["nope"]}, ValueError, r"modules_to_save names \['nope'\]"),
        ((hifi_fast.HiFiConfig(score="pagerank", heads_per_layer=5),), {"batches": [tiny_batch()]}, ValueError, "heads_per_layer=5 exceeds the model's 4 heads"),
        ((hifi_fast.HeadSelection({0: [1]}),), {"master_dtype": "float32"}, TypeError,
         "master_dtype must be a floating torch.dtype .e.g. torch.float32. or None, got 'float32'"),
        ((hifi_fast.HeadSelection({0: [1]}),), {"master_dtype": torch.int8}, TypeError, "got torch.int8"),
    ],
)
def test_bad_patch_arguments(args, kwargs, error, message):
    model = tiny_model("bert")
    with unchanged(model), pytest.raises(error, match=message):
        hifi_fast.patch(model, *args, **kwargs)


def test_a_patch_that_fails_midway_leaves_the_model_as_it_was(monkeypatch):
    """E.g. out of memory for the third projection's compact slices: the two converted before are
    converted back and every ``requires_grad`` flag is as it was; the model can be patched again."""
    from hifi_fast.tuning.modules import HeadSliceMixin

    attach, calls = HeadSliceMixin.attach_slices, []

    def third_fails(module, *args):
        calls.append(module)
        attach(module, *args)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("out of memory (simulated)")

    model = tiny_model("bert")
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    monkeypatch.setattr(HeadSliceMixin, "attach_slices", third_fails)
    with unchanged(model), pytest.raises(torch.OutOfMemoryError, match="simulated"):
        hifi_fast.patch(model, hifi_fast.HeadSelection(SELECTION))
    assert len(calls) == 3
    assert not any(isinstance(m, HeadSliceMixin) or any("hifi" in n for n, _ in m.named_parameters(recurse=False))
                   or any("hifi" in n for n, _ in m.named_buffers(recurse=False)) for m in model.modules())
    monkeypatch.undo()
    hifi_fast.patch(model, hifi_fast.HeadSelection(SELECTION))
    assert {n for n, p in model.named_parameters() if p.requires_grad} >= {"bert.encoder.layer.0.attention.self.query.hifi_weight"}


# --- checkpoints ---------------------------------------------------------------------------------

@pytest.fixture
def checkpoint(tmp_path):
    hifi_fast.save(trained_model("bert", SELECTION), tmp_path)
    return tmp_path


def _refused(model, directory, message, error=CheckpointMismatchError):
    with unchanged(model, directory), pytest.raises(error, match=message):
        hifi_fast.load(model, directory)


def test_load_refuses_other_base_models(checkpoint):
    from transformers import BertConfig, BertForSequenceClassification

    _refused(tiny_model("gpt2"), checkpoint, "another base model .*model_type: checkpoint 'bert', model 'gpt2'")
    _refused(tiny_model("bert", seed=1), checkpoint, "weights fingerprint mismatch")
    _refused(tiny_model("bert").to(torch.float64), checkpoint, "dtype: checkpoint 'float32', model 'float64'")
    renamed = tiny_model("bert")
    renamed.config._name_or_path = "someone/else"
    _refused(renamed, checkpoint, "base_model_name_or_path: checkpoint '', model 'someone/else'")
    bigger = BertForSequenceClassification(BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=48))
    _refused(bigger, checkpoint, "num_layers: checkpoint 3, model 4")
    other_labels = tiny_model("bert", num_labels=5)
    _refused(other_labels, checkpoint, r"classifier.weight is \(3, 32\) torch.float32, the model needs \(5, 32\)")


def test_load_refuses_damaged_checkpoints(checkpoint):
    weights = (checkpoint / WEIGHTS_NAME).read_bytes()
    (checkpoint / WEIGHTS_NAME).write_bytes(weights[: len(weights) // 2])
    _refused(tiny_model("bert"), checkpoint, "hifi_weights.safetensors is not the weights file .*hifi_config.json "
             r"was saved with \(SHA-256 differs\)")
    config = json.loads((checkpoint / CONFIG_NAME).read_text())
    del config["weights_sha256"]  # a checkpoint saved before the hash was recorded
    (checkpoint / CONFIG_NAME).write_text(json.dumps(config))
    _refused(tiny_model("bert"), checkpoint, "hifi_weights.safetensors is not a readable safetensors file")
    (checkpoint / WEIGHTS_NAME).unlink()
    _refused(tiny_model("bert"), checkpoint, "hifi_weights.safetensors is missing", FileNotFoundError)
    (checkpoint / CONFIG_NAME).write_text("{not json")
    _refused(tiny_model("bert"), checkpoint, "hifi_config.json is not valid JSON")
    (checkpoint / CONFIG_NAME).write_text('{"format_version": 99}')
    _refused(tiny_model("bert"), checkpoint, "is not a hifi_fast checkpoint of format 1")
    _refused(tiny_model("bert"), checkpoint / "nowhere", "hifi_config.json is missing", FileNotFoundError)


@pytest.mark.parametrize("key", ["base_fingerprint", "modules_to_save", "selection"])
def test_load_refuses_a_config_without_what_it_needs(checkpoint, key):
    config = json.loads((checkpoint / CONFIG_NAME).read_text())
    del config[key]
    (checkpoint / CONFIG_NAME).write_text(json.dumps(config))
    _refused(tiny_model("bert"), checkpoint, f"hifi_config.json is damaged: it has no {key}")
    with unchanged(tiny_model("bert"), checkpoint), pytest.raises(CheckpointMismatchError, match=f"it has no {key}"):
        hifi_fast.swap(tiny_model("bert"), checkpoint)


def test_load_refuses_a_master_dtype_that_is_no_dtype(checkpoint):
    config = json.loads((checkpoint / CONFIG_NAME).read_text())
    config["master_dtype"] = "Tensor"
    (checkpoint / CONFIG_NAME).write_text(json.dumps(config))
    _refused(tiny_model("bert"), checkpoint, "is damaged: master_dtype 'Tensor' is not a torch dtype")


def test_save_refuses_a_model_cast_since_patching(tmp_path):
    """Its base weights no longer match the fingerprint taken when it was patched: no model could load
    the checkpoint. Cast back, it saves, and the checkpoint loads."""
    model = trained_model("bert", SELECTION).to(torch.bfloat16)
    with unchanged(model), pytest.raises(ValueError, match=r"patched in float32 and cast to bfloat16 since.*"
                                         r"model.to\(torch.float32\)"):
        hifi_fast.save(model, tmp_path)
    assert not any(tmp_path.iterdir())
    hifi_fast.save(model.float(), tmp_path)
    loaded = hifi_fast.load(tiny_model("bert"), tmp_path)
    assert torch.equal(loaded.classifier.weight, model.classifier.weight)


def test_selection_that_does_not_fit_the_weights_file(checkpoint):
    config = json.loads((checkpoint / CONFIG_NAME).read_text())
    config["selection"]["heads"] = {"0": [1, 2], "2": [0, 3]}
    (checkpoint / CONFIG_NAME).write_text(json.dumps(config))
    _refused(tiny_model("bert"), checkpoint, r"query.hifi_weight is \(8, 32\) torch.float32, the model needs \(16, 32\)")
    config["selection"]["heads"] = {"0": [7]}
    (checkpoint / CONFIG_NAME).write_text(json.dumps(config))
    _refused(tiny_model("bert"), checkpoint, r"heads \[7\] of layer 0, but the model has heads 0\.\.3", ValueError)


def test_save_and_load_refuse_the_wrong_model_state(checkpoint):
    model = tiny_model("bert")
    with unchanged(model, checkpoint), pytest.raises(ValueError, match="not patched by hifi_fast .call hifi_fast.patch"):
        hifi_fast.save(model, checkpoint)
    wrapper = torch.nn.Module()  # e.g. DistributedDataParallel: the patched model is its .module
    wrapper.module = trained_model("bert", SELECTION)
    with unchanged(wrapper, checkpoint), pytest.raises(ValueError, match="it wraps one: save model.module"):
        hifi_fast.save(wrapper, checkpoint)
    patched = trained_model("bert", SELECTION)
    _refused(patched, checkpoint, "already patched; load into a fresh base model", ValueError)


def test_interrupted_save_leaves_the_existing_checkpoint_intact(checkpoint, monkeypatch):
    import hifi_fast.storing.checkpoint as ckpt

    def broken_atomic_write(path, write):
        def half_then_full_disk(tmp):
            Path(tmp).write_bytes(b"half a file")
            raise OSError("disk full")

        return atomic_write(path, half_then_full_disk)

    atomic_write = ckpt.atomic_write
    monkeypatch.setattr(ckpt, "atomic_write", broken_atomic_write)
    model = trained_model("bert", SELECTION, seed=0)
    with unchanged(model, checkpoint), pytest.raises(OSError, match="disk full"):
        hifi_fast.save(model, checkpoint)
    assert sorted(os.listdir(checkpoint)) == [CONFIG_NAME, WEIGHTS_NAME]  # no temporary file left behind


# --- backends ------------------------------------------------------------------------------------

def test_unknown_backend_name(monkeypatch):
    from hifi_fast import backends

    monkeypatch.setenv("HIFI_FAST_BACKEND", "metal")
    with pytest.raises(ValueError, match=r"HIFI_FAST_BACKEND='metal' is not one of \('torch', 'triton', 'cuda'\)"):
        backends.backend_name(torch.device("cpu"))
