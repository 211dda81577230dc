"""A patched model trains with the Hugging Face ``Trainer`` unchanged, and ``Trainer.save_model`` works.

Behaviour checked here:

- ``Trainer`` builds its optimizer from the parameters with ``requires_grad=True``, which after
  ``hifi_fast.patch`` are exactly the compact head slices (``*.hifi_weight``/``*.hifi_bias``) and the
  classifier; no extra call is needed after each step.
- Only the selected heads' rows of Q/K/V, columns of O, and the classifier change; every other entry
  of every weight stays bit-identical.
- ``Trainer.save_model`` does not break: it writes an ordinary ``model.safetensors`` of the *full*
  model (base weights holding the trained slices, and the classifier); ``from_pretrained`` of that
  folder gives a plain, unpatched model equal to the fine-tuned one (no ``hifi_*`` keys are saved).
  The small HiFi checkpoint is ``hifi_fast.save(model, dir)``, which works after ``Trainer`` too.

Both optimizers transformers offers by default are covered: ``adamw_torch_fused`` (the default,
which bumps no parameter version counter) and ``adamw_torch``; and a save straight after the last
optimizer step holds that step (both were core bugs before the sync-after-any-step fix).
"""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import hifi_fast  # noqa: E402
from conftest import tiny_batch, tiny_model  # noqa: E402
from transformers import BertForSequenceClassification, Trainer, TrainingArguments  # noqa: E402

SELECTION = {0: [1], 2: [0, 3]}
HEAD_DIM = 8  # tiny BERT: hidden 32, 4 heads


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _dataset(n_batches=4):
    items = []
    for seed in range(n_batches):
        batch = tiny_batch(seed=seed, batch=4, tokens=11, pad_rows={})
        for row in range(4):
            items.append({k: v[row] for k, v in batch.items()})
    return ListDataset(items)


def _plain_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".hifi_" not in k}


def _expected_changed(name, shape):
    """Boolean mask of the entries HiFi may change in state-dict tensor ``name``."""
    mask = torch.zeros(shape, dtype=torch.bool)
    if name.startswith("classifier."):
        mask[...] = True
        return mask
    for layer, heads in SELECTION.items():
        prefix = f"bert.encoder.layer.{layer}.attention."
        for head in heads:
            block = slice(head * HEAD_DIM, (head + 1) * HEAD_DIM)
            for proj in ("self.query", "self.key", "self.value"):
                if name in (f"{prefix}{proj}.weight", f"{prefix}{proj}.bias"):
                    mask[block] = True
            if name == f"{prefix}output.dense.weight":
                mask[:, block] = True
    return mask


OPTIMIZERS = ["adamw_torch", "adamw_torch_fused"]


def _trainer(model, tmp_path, optim, steps=6):
    args = TrainingArguments(
        optim=optim,
        output_dir=str(tmp_path / "trainer"), max_steps=steps, per_device_train_batch_size=4,
        learning_rate=5e-2, warmup_steps=0, weight_decay=0.0, logging_strategy="no", save_strategy="no",
        report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True,
    )
    return Trainer(model=model, args=args, train_dataset=_dataset())


@pytest.mark.parametrize("optim", OPTIMIZERS)
def test_trainer_trains_only_the_selected_slices(tmp_path, optim):
    model = hifi_fast.patch(tiny_model("bert"), hifi_fast.HeadSelection(SELECTION))
    before = _plain_state(model)
    trainer = _trainer(model, tmp_path, optim)
    trainer.train()
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert optimized == trainable
    model.eval()
    with torch.no_grad():
        model(**{k: v for k, v in tiny_batch().items() if k != "labels"})  # syncs the last step's slices
    after = _plain_state(model)
    for name, old in before.items():
        changed = after[name] != old
        allowed = _expected_changed(name, old.shape)
        assert not (changed & ~allowed).any(), f"{name} changed outside the selected heads"
        if name.endswith(".weight") and allowed.any():
            assert changed[allowed].any(), f"{name}: the selected slices did not train"


@pytest.mark.parametrize("optim", OPTIMIZERS)
def test_trainer_save_model_and_hifi_save(tmp_path, optim):
    model = hifi_fast.patch(tiny_model("bert"), hifi_fast.HeadSelection(SELECTION))
    trainer = _trainer(model, tmp_path, optim, steps=4)
    trainer.train()
    batch = {k: v for k, v in tiny_batch(seed=7).items() if k != "labels"}
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits  # this forward also syncs the last step into the base weights

    # Trainer.save_model works: an ordinary full checkpoint (plus the hifi_* copies as extra keys)
    # that from_pretrained loads as a plain, unpatched model equal to the fine-tuned one.
    out = tmp_path / "saved"
    trainer.save_model(str(out))
    assert (out / "model.safetensors").is_file()
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        assert not [k for k in handle.keys() if ".hifi_" in k]
    reloaded = BertForSequenceClassification.from_pretrained(out).eval()
    assert not hifi_fast.is_patched(reloaded)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, expected, rtol=0, atol=1e-6)

    # The small HiFi checkpoint, after Trainer: bit-exact reload into a fresh base model.
    hifi_dir = tmp_path / "hifi"
    hifi_fast.save(model, hifi_dir)
    fresh = hifi_fast.load(tiny_model("bert"), hifi_dir).eval()
    with torch.no_grad():
        assert torch.equal(fresh(**batch).logits, expected)
    assert (hifi_dir / "hifi_weights.safetensors").stat().st_size < (out / "model.safetensors").stat().st_size


@pytest.mark.parametrize("optim", OPTIMIZERS)
def test_trainer_save_model_straight_after_training_holds_the_last_step(tmp_path, optim):
    model = hifi_fast.patch(tiny_model("bert"), hifi_fast.HeadSelection(SELECTION))
    trainer = _trainer(model, tmp_path, optim, steps=4)
    trainer.train()
    out = tmp_path / "saved"
    trainer.save_model(str(out))  # no forward since the last optimizer step
    batch = {k: v for k, v in tiny_batch(seed=7).items() if k != "labels"}
    model.eval()
    reloaded = BertForSequenceClassification.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits, rtol=0, atol=1e-6)
