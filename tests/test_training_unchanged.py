"""Training results do not depend on how the slices are stored.

``tests/data/trained/*.safetensors`` hold the HiFi checkpoints (``hifi_fast.save``: compact slices
and task head) of tiny BERT, GPT-2 and Llama-GQA models after ``STEPS`` SGD steps, made with the
implementation whose trainable slices were compact copies synced into the base weight before every
forward (commit a74dd68, ``python tests/test_training_unchanged.py``). Any later storage of the slices (views of the
base weight, per-run parameters, fused backward) must train to the same values: bit for bit where
the per-element arithmetic is the same, within fp32 rounding where a GEMM's shape changed (the
tolerance below), and for a bf16 model with fp32 master slices too.
"""
import functools
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import hifi_fast
from hifi_fast.tuning import native

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_batch, tiny_model  # noqa: E402

DATA = Path(__file__).parent / "data" / "trained"
STEPS = 3
SELECTIONS = {
    "bert": {0: [1, 3], 1: [0], 2: [0, 1, 2, 3]},  # separated heads, one head, every head
    "gpt2": {0: [0, 2], 1: [1, 2], 2: [3]},  # fused Conv1D QKV, adjacent and separated heads
    "llama": {0: [0, 4], 1: [1, 2], 2: [5]},  # 6 query heads, 2 KV groups: both groups, one group
}
CASES = [(family, master) for family in SELECTIONS for master in (False, True)]


def train(family: str, master: bool) -> dict[str, torch.Tensor]:
    """The checkpoint tensors after ``STEPS`` steps (bf16 model with fp32 slices if ``master``)."""
    model = tiny_model(family, dtype=torch.bfloat16 if master else torch.float32).train()
    for module in model.modules():  # dropout off: the result must not depend on the random stream
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    hifi_fast.patch(model, hifi_fast.HeadSelection(SELECTIONS[family]), master_dtype=torch.float32 if master else None)
    # SGD with momentum: Adam divides each gradient by its own size, so for an entry whose gradient is
    # rounding noise (a key bias's: exactly 0) any reordered sum flips a full-size step.
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    for step in range(STEPS):
        optimizer.zero_grad()
        model(**tiny_batch(seed=step)).loss.backward()
        optimizer.step()
    return {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def _name(family: str, master: bool) -> Path:
    return DATA / f"{family}{'-master-fp32' if master else ''}.safetensors"


@pytest.mark.parametrize("node", ["native", "python"])  # HIFI_FAST_NATIVE=1 / 0: the C++ node, the Python Function
@pytest.mark.parametrize("family, master", CASES)
def test_trained_values_equal_those_of_the_compact_copy_implementation(family, master, node, monkeypatch):
    monkeypatch.setenv("HIFI_FAST_NATIVE", "1" if node == "native" else "0")
    monkeypatch.setattr(native, "extension", functools.lru_cache(native.extension.__wrapped__))
    want = load_file(_name(family, master))
    got = train(family, master)
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        # A slice gradient taken by a GEMM of another shape (on a view rather than a gathered copy)
        # rounds differently in fp32: the trained values agree to fp32 rounding, not bit for bit.
        torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


if __name__ == "__main__":
    from safetensors.torch import save_file

    DATA.mkdir(parents=True, exist_ok=True)
    for family, master in CASES:
        save_file({k: v.contiguous() for k, v in train(family, master).items()}, _name(family, master))
        print("written", _name(family, master))
