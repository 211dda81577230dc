"""patch/unpatch (DESIGN §1.6, §2): gradient equivalence with masked full fine-tuning, no full-size
weight gradient, one GEMM per projection, parameter counts and refused bad input."""
import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import hifi_fast
from conftest import tiny_batch, tiny_model
from reference import geometry, trainable_masks

SELECTIONS = {
    "bert": {0: [1], 2: [0, 3]},
    "gpt2": {0: [0, 1, 2, 3], 1: [2]},
    "llama": {0: [0, 1], 1: [4], 2: [2, 5]},  # 6 query heads, 2 KV groups of 3
}
TASK_HEAD = {"bert": "classifier", "gpt2": "score", "llama": "score"}


def _loss(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss


def test_one_sgd_step_equals_masked_full_fine_tuning(family):
    base = tiny_model(family)
    batch, lr = tiny_batch(seed=5), 0.5
    patched = hifi_fast.patch(copy.deepcopy(base), hifi_fast.HeadSelection(SELECTIONS[family]))
    opt = torch.optim.SGD([p for p in patched.parameters() if p.requires_grad], lr=lr)
    _loss(patched, batch).backward()
    opt.step()
    logits_after = patched(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    full = copy.deepcopy(base)
    masks = trainable_masks(full, family, SELECTIONS[family], (TASK_HEAD[family],))
    _loss(full, batch).backward()
    with torch.no_grad():
        for name, p in full.named_parameters():
            p -= lr * p.grad * masks[name]
    full_logits = full(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(logits_after, full_logits, atol=1e-6, rtol=0)

    merged = dict(hifi_fast.unpatch(patched).named_parameters())
    for name, p in full.named_parameters():
        torch.testing.assert_close(merged[name], p, atol=1e-6, rtol=0)
        untouched = ~masks[name]
        assert torch.equal(merged[name][untouched], dict(base.named_parameters())[name][untouched]), name
        if masks[name].any() and name.split(".")[0] != TASK_HEAD[family]:
            assert not torch.equal(merged[name], dict(base.named_parameters())[name]), f"{name} did not train"


def test_merging_into_a_copy_trains_like_writing_into_the_weight(family):
    """Under FSDP (marked ``_is_fsdp_managed_module``) the forward merges the slices into a copy of
    the weight instead of writing them into it: same losses, gradients and trained model over three
    steps, for every layout (separate Q/K/V, fused Conv1D, GQA), while the base weights stay as they
    were until the state dict asks for them."""
    base = tiny_model(family)
    batch = tiny_batch(seed=5)
    runs = []
    for merge in (False, True):
        model = hifi_fast.patch(copy.deepcopy(base), hifi_fast.HeadSelection(SELECTIONS[family]))
        hifi_modules = [m for m in model.modules() if hasattr(m, "hifi_weight")]
        for module in hifi_modules:
            module._is_fsdp_managed_module = merge
            if merge:  # FSDP shards every parameter on its own: slices that were views stop being so
                for param in (module.hifi_weight, module.hifi_bias):
                    if param is not None:
                        param.data = param.detach().clone()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        losses, grads = [], []
        for _ in range(3):
            opt.zero_grad()
            loss = _loss(model, batch)
            loss.backward()
            losses.append(loss.detach())
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
            opt.step()
        if merge:
            for module, (name, weight) in zip(hifi_modules, _base_weights(base, hifi_modules, model)):
                assert torch.equal(module.weight, weight), f"{name} was written during the forward"
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        runs.append((losses, grads, logits, hifi_fast.unpatch(model).state_dict()))
    (losses, grads, logits, state), (m_losses, m_grads, m_logits, m_state) = runs
    torch.testing.assert_close(torch.stack(m_losses), torch.stack(losses), rtol=1e-6, atol=1e-7)
    for step, (g, mg) in enumerate(zip(grads, m_grads)):
        for name in g:
            torch.testing.assert_close(mg[name], g[name], rtol=1e-5, atol=1e-7, msg=lambda m: f"step {step} {name}: {m}")
    torch.testing.assert_close(m_logits, logits, rtol=1e-6, atol=1e-6)
    for name in state:
        torch.testing.assert_close(m_state[name], state[name], rtol=1e-6, atol=1e-7)


def _base_weights(base, hifi_modules, model):
    names = {id(m): n for n, m in model.named_modules()}
    plain = dict(base.named_modules())
    return [(names[id(m)], plain[names[id(m)]].weight) for m in hifi_modules]


def test_frozen_parameters_never_get_a_gradient(family):
    model = hifi_fast.patch(tiny_model(family), hifi_fast.HeadSelection(SELECTIONS[family]))
    _loss(model, tiny_batch()).backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name
        if p.requires_grad:
            assert p.grad.shape == p.shape


def test_saved_tensors_hold_no_full_size_weight_copy(family):
    model = hifi_fast.patch(tiny_model(family), hifi_fast.HeadSelection(SELECTIONS[family]))
    weights = {tuple(p.shape): p for n, p in model.named_parameters() if n.endswith("weight") and p.dim() == 2}
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = _loss(model, tiny_batch())
    loss.backward()
    for t in saved:
        shape = tuple(t.shape)
        if shape in weights or shape[::-1] in weights:
            assert t.untyped_storage().data_ptr() in storages, f"saved a copy of a {shape} weight"


class _CountGemms(TorchDispatchMode):
    GEMMS = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket.__name__ in self.GEMMS
        return func(*args, **(kwargs or {}))


def test_forward_costs_the_base_models_gemms(family):
    base = tiny_model(family)
    patched = hifi_fast.patch(copy.deepcopy(base), hifi_fast.HeadSelection(SELECTIONS[family]))
    batch = tiny_batch()
    counts = []
    for model in (base, patched):
        with _CountGemms() as mode:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        counts.append(mode.count)
    assert counts[0] == counts[1] > 0


def _expected_trainable(model, family, selection):
    num_layers, num_heads, kv_heads, d, hidden = geometry(model, family)
    group = num_heads // kv_heads
    total = sum(p.numel() for p in getattr(model, TASK_HEAD[family]).parameters())
    for heads in selection.values():
        groups = len({h // group for h in heads})
        if family == "llama":  # no biases; K/V rows per group
            total += len(heads) * 2 * d * hidden + groups * 2 * d * hidden
        else:  # Q/K/V rows with bias, O columns without
            total += len(heads) * (3 * (d * hidden + d) + hidden * d)
    return total


def test_trainable_parameter_count_matches_formula(family, capsys):
    model = tiny_model(family)
    total = sum(p.numel() for p in model.parameters())
    expected = _expected_trainable(model, family, SELECTIONS[family])
    hifi_fast.patch(model, hifi_fast.HeadSelection(SELECTIONS[family]))
    assert hifi_fast.count_parameters(model) == (expected, total)
    hifi_fast.print_trainable_parameters(model)
    assert capsys.readouterr().out.strip() == (
        f"trainable params: {expected:,d} || all params: {total:,d} || trainable%: {100 * expected / total:.4f}"
    )


def test_adamw_steps_reach_the_next_forward_and_unpatch_restores_plain_model(family):
    base = tiny_model(family)
    model = hifi_fast.patch(copy.deepcopy(base), hifi_fast.HeadSelection(SELECTIONS[family]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = tiny_batch()
    for _ in range(2):
        opt.zero_grad()
        _loss(model, batch).backward()
        opt.step()
    trained = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    plain = hifi_fast.unpatch(model)
    assert not hasattr(plain, "hifi_state")
    assert not any("hifi" in n for n, _ in plain.named_parameters())
    assert not any("HiFi" in type(m).__name__ for m in plain.modules())
    assert all(p.requires_grad for p in plain.parameters())
    torch.testing.assert_close(plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, trained)
    assert set(plain.state_dict()) == set(base.state_dict())


def test_patch_with_config_scores_and_selects():
    model = tiny_model("llama")
    cfg = hifi_fast.HiFiConfig(score="pagerank", heads_per_layer=2, num_scoring_examples=6)
    hifi_fast.patch(model, cfg, batches=[tiny_batch(), tiny_batch(seed=1)])
    selection = model.hifi_state.selection
    assert all(len(h) == 2 for h in selection.heads.values()) and len(selection.heads) == 3
    assert selection.scores.num_examples == 6


def test_modules_to_save_empty_trains_slices_only():
    model = hifi_fast.patch(tiny_model("bert"), hifi_fast.HeadSelection({0: [1]}), modules_to_save=[])
    assert all("hifi_" in n for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("optimizer", ["fused", "foreach", "single"])
def test_every_optimizer_kind_reaches_the_next_forward(optimizer):
    model = hifi_fast.patch(tiny_model("bert"), hifi_fast.HeadSelection(SELECTIONS["bert"]))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, **{optimizer: True} if optimizer != "single" else {"foreach": False})
    batch = tiny_batch()
    _loss(model, batch).backward()
    opt.step()
    trained = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    merged = hifi_fast.unpatch(copy.deepcopy(model))
    torch.testing.assert_close(merged(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, trained)
    query = model.bert.encoder.layer[0].attention.self.query
    torch.testing.assert_close(query.weight[8:16], query.hifi_weight, rtol=0, atol=0)  # head 1, d_h = 8
    assert query.hifi_weight.data_ptr() == query.weight[8:16].data_ptr()  # one head: a view, stepped in place


def test_state_dict_is_the_plain_models_and_load_refreshes_the_slices():
    base = tiny_model("bert")
    model = hifi_fast.patch(copy.deepcopy(base), hifi_fast.HeadSelection(SELECTIONS["bert"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, fused=True)
    _loss(model, tiny_batch()).backward()
    opt.step()  # no forward since: state_dict must write the new slices into the base weight first
    state = model.state_dict()
    assert state.keys() == base.state_dict().keys()
    query = model.bert.encoder.layer[0].attention.self.query
    torch.testing.assert_close(state["bert.encoder.layer.0.attention.self.query.weight"][8:16], query.hifi_weight, rtol=0, atol=0)

    other = hifi_fast.patch(copy.deepcopy(base), hifi_fast.HeadSelection(SELECTIONS["bert"]))
    assert other.load_state_dict(state).missing_keys == []
    torch.testing.assert_close(other.bert.encoder.layer[0].attention.self.query.hifi_weight, query.hifi_weight, rtol=0, atol=0)
    plain = copy.deepcopy(base)
    plain.load_state_dict(state)
    batch = tiny_batch(seed=4)
    torch.testing.assert_close(plain(**batch).logits, model(**batch).logits, rtol=0, atol=0)


def test_a_patched_model_pickles_whole(family):
    """``torch.save(model)`` / ``torch.load``: the copy computes the same logits and trains its own
    slices (its hooks and cached call arguments are rebuilt on unpickling)."""
    import io

    model = hifi_fast.patch(tiny_model(family), hifi_fast.HeadSelection({0: [0, 2], 1: [1]}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "hifi_weight" in name:
                p.add_(0.5)  # slices that differ from the base weight's original values
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    copy_ = torch.load(buffer, weights_only=False)
    batch = tiny_batch()
    torch.testing.assert_close(copy_(**batch).logits, model(**batch).logits, rtol=0, atol=0)
    copy_(**batch).loss.backward()
    slices = {n: p for n, p in copy_.named_parameters() if "hifi_" in n}
    assert slices and all(p.grad is not None for p in slices.values())
    assert all(p.grad is None for n, p in model.named_parameters())  # the original is untouched
    assert copy_.state_dict().keys() == model.state_dict().keys()
