"""torch.compile and gradient checkpointing of patched models give the eager gradients."""
import copy

import pytest
import torch

import hifi_fast
from conftest import tiny_batch, tiny_model

SELECTION = hifi_fast.HeadSelection({0: [1], 1: [0, 2]})


def _grads(model, batch, call=None):
    model.zero_grad(set_to_none=True)
    (model if call is None else call)(**batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same_grads(a, b):
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_patched_projection_compiles_without_graph_break(family):
    model = hifi_fast.patch(tiny_model(family), SELECTION)
    layer = dict(model.named_modules())[model.hifi_state.slices[0].module_name]
    x = torch.randn(3, 7, 32, requires_grad=True)
    explanation = torch._dynamo.explain(layer)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    compiled(x).square().sum().backward()
    expected = layer.hifi_weight.grad.clone(), x.grad.clone()
    layer.hifi_weight.grad, x.grad = None, None
    layer(x).square().sum().backward()
    torch.testing.assert_close(expected[0], layer.hifi_weight.grad)
    torch.testing.assert_close(expected[1], x.grad)


def test_compiled_model_trains_like_eager():
    model = hifi_fast.patch(tiny_model("llama"), SELECTION)
    batch = tiny_batch()
    eager = _grads(model, batch)
    compiled = torch.compile(model, backend="aot_eager")
    _assert_same_grads(_grads(model, batch, call=compiled), eager)
    # an optimizer step between compiled forwards reaches the next forward
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.hifi_weight.add_(0.5)
    expected = model(**batch).logits
    torch.testing.assert_close(compiled(**batch).logits, expected)


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_gradients(family, reentrant):
    model = hifi_fast.patch(tiny_model(family), SELECTION).train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    reference = copy.deepcopy(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    batch = tiny_batch()
    _assert_same_grads(_grads(model, batch), _grads(reference, batch))
