"""Where the trainable slices live: views of the weight where the selected heads are one contiguous
run of its rows, compact copies written into the weight after each optimizer step otherwise.
Whatever happens to the model (copies, conversions, loads, in-place edits, any optimizer), the
forward reads the trained values and the plain model holds them."""
import copy

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import hifi_fast
from conftest import tiny_batch, tiny_model
from hifi_fast.tuning.modules import HeadSliceMixin

SELECTIONS = {
    "bert": {0: [1], 1: [1, 2], 2: [0, 3]},  # one head, adjacent heads, separated heads
    "gpt2": {0: [0, 2], 1: [3]},  # Conv1D stores [d_in, d_out]: no row slice is contiguous
    "llama": {0: [0, 1], 1: [1, 4], 2: [5]},  # 6 query heads in 2 KV groups of 3
}


def _modules(model) -> dict[str, HeadSliceMixin]:
    return {name: m for name, m in model.named_modules() if isinstance(m, HeadSliceMixin)}


def _is_view(module) -> bool:
    weight = module.weight_2d()
    start, length = module.hifi_plan.view
    return module.hifi_weight.data_ptr() == weight.narrow(0, start, length).data_ptr()


def test_views_where_the_heads_are_one_run_of_rows_copies_elsewhere():
    views = {name: m.hifi_plan.view is not None for name, m in _modules(
        hifi_fast.patch(tiny_model("bert"), hifi_fast.HeadSelection(SELECTIONS["bert"]))).items()}
    for name, is_view in views.items():
        layer = int(name.split(".")[3])
        assert is_view == (layer in (0, 1) and "output" not in name), name  # columns are never contiguous
    llama = _modules(hifi_fast.patch(tiny_model("llama"), hifi_fast.HeadSelection(SELECTIONS["llama"])))
    assert llama["model.layers.1.self_attn.k_proj"].hifi_plan.view == (0, 16)  # heads 1, 4: both KV groups, adjacent
    assert llama["model.layers.1.self_attn.q_proj"].hifi_plan.view is None  # heads 1 and 4: two runs
    assert all(m.hifi_plan.view is None for m in _modules(
        hifi_fast.patch(tiny_model("gpt2"), hifi_fast.HeadSelection(SELECTIONS["gpt2"]))).values())
    assert all(m.hifi_plan.view is None for m in _modules(hifi_fast.patch(
        tiny_model("bert", dtype=torch.bfloat16), hifi_fast.HeadSelection(SELECTIONS["bert"]),
        master_dtype=torch.float32)).values())  # fp32 master slices of a bf16 model are copies


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _train(model, optimizer_kind="fused", steps=2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2,
                            **({optimizer_kind: True} if optimizer_kind != "single" else {"foreach": False}))
    for step in range(steps):
        opt.zero_grad()
        model(**tiny_batch(seed=step)).loss.backward()
        opt.step()
    return model


def _plain_twin(model):
    """What the patched model computes, as a plain model: the state dict holds the slices."""
    plain = copy.deepcopy(model)
    return hifi_fast.unpatch(plain)


TRANSFORMS = {
    "deepcopy": copy.deepcopy,
    "to float64 and back": lambda m: m.double().float(),
    "load_state_dict(assign=True)": lambda m: (m.load_state_dict({k: v.clone() for k, v in m.state_dict().items()},
                                                                 assign=True), m)[1],
}


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_after_copies_conversions_and_loads_training_still_reaches_the_weight(family, transform):
    model = _train(hifi_fast.patch(tiny_model(family), hifi_fast.HeadSelection(SELECTIONS[family])))
    model = TRANSFORMS[transform](model)
    before = {n: m.weight.detach().clone() for n, m in _modules(model).items()}
    _train(model)
    batch = tiny_batch(seed=9)
    for name, module in _modules(model).items():
        assert not torch.equal(module.weight, before[name]), f"{name}: the optimizer's steps did not reach the weight"
        if module.hifi_plan.view is not None:
            assert _is_view(module), name
    torch.testing.assert_close(_logits(model, batch), _logits(_plain_twin(model), batch), rtol=0, atol=0)


@pytest.mark.parametrize("optimizer_kind", ["fused", "foreach", "single"])
def test_in_place_edits_outside_an_optimizer_step_reach_the_next_forward(optimizer_kind):
    model = _train(hifi_fast.patch(tiny_model("bert"), hifi_fast.HeadSelection(SELECTIONS["bert"])), optimizer_kind)
    modules = _modules(model)
    with torch.no_grad():
        for module in modules.values():  # views and copies alike
            module.hifi_weight.mul_(1.5)
    batch = tiny_batch(seed=3)
    got = _logits(model, batch)
    for name, module in modules.items():
        dim = 0 if module.hifi_plan.sliced == "rows" else 1
        assert torch.equal(module.weight_2d().index_select(dim, module.hifi_index), module.hifi_weight), name
    torch.testing.assert_close(got, _logits(_plain_twin(model), batch), rtol=0, atol=0)


def _ops(fn) -> list[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return [e.name for e in prof.events()]


def test_no_slice_write_in_forward_or_backward_and_one_batched_write_per_step():
    model = hifi_fast.patch(tiny_model("bert"), hifi_fast.HeadSelection(SELECTIONS["bert"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, fused=True)
    model(**tiny_batch()).loss.backward()
    step_ops = _ops(opt.step)
    assert step_ops.count("aten::_foreach_copy_") == 1  # every compact slice of the model in one call
    batch = tiny_batch(seed=1)
    forward_backward = _ops(lambda: model(**batch).loss.backward())
    writes = [name for name in forward_backward if name in ("aten::index_copy_", "aten::_foreach_copy_")]
    assert writes == []
    plain = tiny_model("bert").requires_grad_(False)
    plain.get_input_embeddings().weight.requires_grad_(True)
    plain_ops = _ops(lambda: plain(**batch).loss.backward())
    assert forward_backward.count("aten::arange") == plain_ops.count("aten::arange")  # the gather index: at patch time


def test_unpatch_forgets_the_module():
    from hifi_fast.tuning.modules import _compact_modules

    model = hifi_fast.patch(tiny_model("bert"), hifi_fast.HeadSelection(SELECTIONS["bert"]))
    compact = [m for m in _modules(model).values() if m.hifi_plan.view is None]
    assert compact and all(m in _compact_modules for m in compact)
    hifi_fast.unpatch(model)
    assert not any(m in _compact_modules for m in compact)


def _step(model, opt, seed=0):
    opt.zero_grad()
    model(**tiny_batch(seed=seed)).loss.backward()
    opt.step()


def test_a_weight_replaced_between_steps_of_one_optimizer_still_gets_the_slices():
    """The post-step write is planned once per optimizer; a weight assigned anew (not through
    ``_apply`` or a load) is noticed at the next step and written instead of the old one."""
    model = hifi_fast.patch(tiny_model("bert"), hifi_fast.HeadSelection(SELECTIONS["bert"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, fused=True)
    _step(model, opt)
    compact = {n: m for n, m in _modules(model).items() if m.hifi_plan.view is None}
    for module in compact.values():
        module.weight = torch.nn.Parameter(module.weight.detach().clone(), requires_grad=False)
    before = {n: m.weight.detach().clone() for n, m in compact.items()}
    _step(model, opt, seed=1)
    for name, module in compact.items():
        dim = 0 if module.hifi_plan.sliced == "rows" else 1
        assert not torch.equal(module.weight, before[name]), name
        assert torch.equal(module.weight_2d().index_select(dim, module.hifi_index), module.hifi_weight), name


def test_an_optimizer_that_outlives_its_model_holds_none_of_its_weights():
    """The write plan holds views of the weights (their storage): it goes with the model."""
    import gc

    from hifi_fast.tuning.modules import _write_plans

    model = hifi_fast.patch(tiny_model("bert"), hifi_fast.HeadSelection(SELECTIONS["bert"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, fused=True)
    _step(model, opt)
    assert opt in _write_plans
    del model
    gc.collect()
    assert opt not in _write_plans
    opt.step()  # the optimizer still steps its slices; nothing is left to write
    assert opt in _write_plans and not _write_plans[opt][1]
