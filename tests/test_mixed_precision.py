"""Mixed precision: fp32 master slices for a bf16 model, and autocast bf16 on CPU."""
import copy

import torch

import hifi_fast
from conftest import tiny_batch, tiny_model
from reference import trainable_masks

SELECTION = {0: [1], 2: [0, 3]}


def test_fp32_master_slices_for_a_bf16_model(tmp_path):
    model = tiny_model("bert", dtype=torch.bfloat16)
    cfg = hifi_fast.HiFiConfig(heads_per_layer=1, master_dtype=torch.float32)
    hifi_fast.patch(model, hifi_fast.HeadSelection(SELECTION), master_dtype=cfg.master_dtype)
    query = model.bert.encoder.layer[0].attention.self.query
    assert query.hifi_weight.dtype == torch.float32 and query.weight.dtype == torch.bfloat16
    start = query.hifi_weight.detach().clone()
    optimizer = torch.optim.SGD([query.hifi_weight], lr=1.0)
    batch = tiny_batch()
    for _ in range(4):  # updates far below bf16's resolution of the weights
        optimizer.zero_grad()
        model(**batch).loss.backward()
        assert query.hifi_weight.grad.dtype == torch.float32
        query.hifi_weight.grad.mul_(1e-4 / query.hifi_weight.grad.abs().max())
        optimizer.step()
    moved = (query.hifi_weight.detach() - start).abs().max().item()
    assert 3e-4 < moved <= 4e-4 + 1e-7  # the fp32 master keeps every small update
    model(**batch)  # the forward writes the master (rounded) into the bf16 base weight
    head_1_rows = query.weight[8:16]  # 4 heads of d_h = 8
    torch.testing.assert_close(head_1_rows, query.hifi_weight.to(torch.bfloat16), rtol=0, atol=0)
    hifi_fast.save(model, tmp_path)
    fresh = hifi_fast.load(tiny_model("bert", dtype=torch.bfloat16), tmp_path)
    assert torch.equal(fresh.bert.encoder.layer[0].attention.self.query.hifi_weight, query.hifi_weight)


def test_autocast_bf16_on_cpu_matches_masked_full_fine_tuning():
    base = tiny_model("llama")
    batch = tiny_batch()
    patched = hifi_fast.patch(copy.deepcopy(base), hifi_fast.HeadSelection(SELECTION))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        patched(**batch).loss.backward()
    full = copy.deepcopy(base)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full(**batch).loss.backward()
    masks = trainable_masks(full, "llama", SELECTION, ("score",))
    full_grads = dict(full.named_parameters())
    modules = dict(patched.named_modules())
    for spec in patched.hifi_state.slices:
        module = modules[spec.module_name]
        assert module.hifi_weight.grad.dtype == torch.float32
        name = spec.module_name + ".weight"
        expected = full_grads[name].grad[masks[name]].view_as(module.hifi_weight)
        torch.testing.assert_close(module.hifi_weight.grad, expected, rtol=2e-2, atol=2e-3)
