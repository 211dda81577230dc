"""Faults: a NaN/inf loss or gradient never reaches the weights (``hifi_fast.NonFiniteGuard``, and
the CLI's training loop, which uses it).

NaN is injected into a batch (the loss of one forward call) and into a gradient (a hook on a trained
slice); the step is skipped with the slices and the base weights unchanged, counted and logged, the
next finite step trains as usual, and N skips in a row stop the run with an error naming the step.
"""
import logging

import pytest
import torch

import hifi_fast
from hifi_fast.cli.data import Encoded
from hifi_fast.cli.train import train_model

from conftest import tiny_batch, tiny_model

SELECTION = {0: [1], 2: [0, 3]}


def _patched():
    model = hifi_fast.patch(tiny_model("bert"), hifi_fast.HeadSelection(SELECTION)).train()
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def _state(model):
    """Every weight the forward reads (base weights included), cloned."""
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, before):
    return all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def _nan_loss_on_calls(model, calls):
    """Make the loss of the given forward calls (0-based) NaN, like a batch of bad data."""
    count = [0]

    def hook(_module, _args, output):
        if count[0] in calls:
            output.loss = output.loss * float("nan")
        count[0] += 1
        return output

    return model.register_forward_hook(hook)


def test_plain_step_writes_nan_into_the_base_weights():
    # Why the guard exists: without it, one NaN gradient reaches the base weight through the slices.
    model, optimizer = _patched()
    model.bert.encoder.layer[0].attention.self.query.hifi_weight.register_hook(lambda g: g * float("nan"))
    model(**tiny_batch()).loss.backward()
    optimizer.step()
    assert torch.isnan(model.state_dict()["bert.encoder.layer.0.attention.self.query.weight"]).any()


@pytest.mark.parametrize("fault", ["loss", "gradient"])
def test_guard_skips_a_non_finite_step_and_trains_the_next(fault, caplog):
    model, optimizer = _patched()
    guard = hifi_fast.NonFiniteGuard(model, max_consecutive=3)
    if fault == "loss":
        handle = _nan_loss_on_calls(model, {0})
    else:
        slice_ = model.bert.encoder.layer[2].attention.output.dense.hifi_weight
        handle = slice_.register_hook(lambda g: torch.full_like(g, float("inf")))
    before = _state(model)
    loss = model(**tiny_batch()).loss
    loss.backward()
    with caplog.at_level(logging.WARNING, logger="hifi_fast.tuning.guard"):
        assert guard.step(optimizer, loss, where="step 7 (batch 3)") is False
    assert _unchanged(model, before)
    assert all(p.grad is None for p in model.parameters())
    assert guard.skipped == 1
    assert f"skipped the optimizer step at step 7 (batch 3): non-finite {fault}" in caplog.text
    handle.remove()

    loss = model(**tiny_batch(seed=1)).loss
    loss.backward()
    assert guard.step(optimizer, loss) is True
    assert not _unchanged(model, before) and guard.consecutive == 0
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())


def test_guard_stops_after_n_consecutive_skips():
    model, optimizer = _patched()
    guard = hifi_fast.NonFiniteGuard(model, max_consecutive=2)
    _nan_loss_on_calls(model, {0, 1, 2})
    before = _state(model)
    loss = model(**tiny_batch()).loss
    loss.backward()
    assert guard.step(optimizer, loss, where="step 1") is False
    loss = model(**tiny_batch()).loss
    loss.backward()
    with pytest.raises(hifi_fast.NonFiniteStepError, match="2 consecutive steps had a non-finite loss or gradient, "
                       "the last at step 2"):
        guard.step(optimizer, loss, where="step 2")
    assert _unchanged(model, before)
    with pytest.raises(ValueError, match="max_consecutive must be >= 1"):
        hifi_fast.NonFiniteGuard(model, max_consecutive=0)


def _data(n=24):
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(2, 97, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]
    return Encoded(ids, None, [i % 3 for i in range(n)], 0)


def test_training_loop_skips_a_bad_batch_and_finishes(caplog):
    model, _ = _patched()
    _nan_loss_on_calls(model, {2})
    with caplog.at_level(logging.WARNING, logger="hifi_fast.tuning.guard"):
        result = train_model(model, _data(), epochs=2, batch_size=8, lr=1e-2, progress=False)
    assert result.skipped_steps == 1 and result.steps == 6
    assert "at epoch 1, batch 3 (step 3): non-finite loss" in caplog.text
    assert all(torch.isfinite(torch.tensor(result.epoch_losses)))
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())


def test_training_loop_stops_naming_the_step_and_batch():
    model, _ = _patched()
    _nan_loss_on_calls(model, set(range(3, 100)))
    with pytest.raises(hifi_fast.NonFiniteStepError, match=r"the last at epoch 2, batch 2 \(step 5\)"):
        train_model(model, _data(), epochs=2, batch_size=8, lr=1e-2, max_consecutive_skips=2, progress=False)
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
