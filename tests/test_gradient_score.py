"""``score="gradient"``: each head's L1 norm of the loss gradient over the slices it would train,
against plain autograd on every weight of a float64 model with the slices cut out by hand (BERT,
GPT-2's fused Conv1D QKV, Llama with GQA, a causal LM; padding included); selection, serialisation,
the shared warm-up and errors. Distributed scoring is checked with importance in test_importance."""
import pytest
import torch

import hifi_fast
from hifi_fast.heads import HeadScores
from conftest import tiny_batch, tiny_model
from reference import O_PROJ, geometry
from test_importance import _batches, tiny_lm

QKV = {
    "bert": ["bert.encoder.layer.{}.attention.self." + n for n in ("query", "key", "value")],
    "llama": ["model.layers.{}.self_attn." + n for n in ("q_proj", "k_proj", "v_proj")],
    "gpt2": ["transformer.h.{}.attn.c_attn"],
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is far faster here


def _grad(module, fused_gpt2: bool):
    """``(weight grad [out, in], bias grad or None)`` of a projection (GPT-2's Conv1D is ``[in, out]``)."""
    weight = module.weight.grad.t() if fused_gpt2 else module.weight.grad
    return weight, None if module.bias is None else module.bias.grad


def reference_gradient(model, family, batches, causal_lm=False):
    """Per batch: summed loss, every parameter's gradient by autograd, then per head the L1 norm of
    its Q rows, its K/V group's rows (biases included) and its O columns; summed, / examples."""
    num_layers, num_heads, kv_heads, d, _ = geometry(model, family)
    group = num_heads // kv_heads
    modules = dict(model.named_modules())
    total, count = torch.zeros(num_layers, num_heads, dtype=torch.float64), 0
    for batch in batches:
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
        if causal_lm:
            targets = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none",
                                                    ignore_index=-100)
            loss = (nll.sum(1) / (targets != -100).sum(1).clamp_min(1)).sum()
        else:
            loss = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum")
        loss.backward()
        for layer in range(num_layers):
            o_weight, _ = _grad(modules[O_PROJ[family].format(layer)], family == "gpt2")
            proj = [_grad(modules[name.format(layer)], family == "gpt2") for name in QKV[family]]
            if family == "gpt2":  # fused [Q | K | V] output rows
                (weight, bias), width = proj[0], num_heads * d
                proj = [(weight[i * width:(i + 1) * width], bias[i * width:(i + 1) * width]) for i in range(3)]
            for head in range(num_heads):
                rows = [slice(head * d, (head + 1) * d)] + [slice((head // group) * d, (head // group + 1) * d)] * 2
                value = o_weight[:, head * d:(head + 1) * d].abs().sum()
                for (weight, bias), r in zip(proj, rows):
                    value += weight[r].abs().sum() + (0 if bias is None else bias[r].abs().sum())
                total[layer, head] += value
        count += batch["input_ids"].shape[0]
    model.zero_grad(set_to_none=True)
    return total / count


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_gradient_equals_autograd_on_every_weight(family):
    model = tiny_model(family).double()
    batches = _batches()
    expected = reference_gradient(model, family, batches)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    scores = hifi_fast.score_heads(model, batches, gradient=True, warmup_steps=0)
    torch.testing.assert_close(scores.gradient, expected, rtol=1e-10, atol=1e-12)
    assert scores.importance is None and scores.num_examples == 7
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert all(p.grad is None for p in model.parameters())
    # one backward serves both task scores
    both = hifi_fast.score_heads(model, batches, gradient=True, importance=True, warmup_steps=0)
    torch.testing.assert_close(both.gradient, expected, rtol=1e-10, atol=1e-12)
    assert both.importance is not None


def test_causal_lm_gradient_is_next_token_loss():
    model = tiny_lm().double()
    batches = [{k: v for k, v in b.items() if k != "labels"} for b in _batches()]
    expected = reference_gradient(model, "llama", batches, causal_lm=True)
    scores = hifi_fast.score_heads(model, batches, gradient=True)
    torch.testing.assert_close(scores.gradient, expected, rtol=1e-10, atol=1e-12)


def test_selection_serialisation_and_warmup():
    cfg = hifi_fast.HiFiConfig(heads_per_layer=2, score="gradient", importance_warmup_steps=10, keep_warmed_head=False)
    model = tiny_model("bert")
    head = model.classifier.weight.clone()
    patched = hifi_fast.patch(model, cfg, batches=_batches())
    scores = patched.hifi_state.selection.scores
    assert torch.equal(model.classifier.weight, head)  # warm-up for the scores only
    chosen = {layer: sorted(torch.topk(scores.gradient[layer], 2).indices.tolist()) for layer in range(3)}
    assert patched.hifi_state.selection.heads == chosen
    again = HeadScores.from_dict(scores.to_dict())
    assert torch.equal(again.gradient, scores.gradient) and again.importance is None
    # the warm-up changes the scores (the loss is the warmed head's)
    cold = hifi_fast.score_heads(tiny_model("bert"), _batches(), gradient=True, warmup_steps=0)
    assert not torch.allclose(cold.gradient, scores.gradient)
    globally = hifi_fast.select_heads(scores, hifi_fast.HiFiConfig(heads_per_layer=1, score="gradient", selection="global"))
    normalised = scores.gradient / scores.gradient.norm(dim=-1, keepdim=True)
    top = torch.topk(normalised.flatten(), 3).indices.tolist()
    assert globally.heads == {i // 4: sorted(j % 4 for j in top if j // 4 == i // 4) for i in top}


def test_errors():
    plain = hifi_fast.score_heads(tiny_model("bert"), _batches())
    with pytest.raises(ValueError, match=r"score='gradient' needs head gradient in the scores.*gradient=True"):
        hifi_fast.select_heads(plain, hifi_fast.HiFiConfig(score="gradient"))
    model = hifi_fast.patch(tiny_model("bert"), hifi_fast.HeadSelection({0: [1]}))
    with pytest.raises(ValueError, match="unpatch the model first"):
        hifi_fast.score_heads(model, _batches(), gradient=True)
    with pytest.raises(ValueError, match="scoring batch 0 has no 'labels'"):
        hifi_fast.score_heads(tiny_model("bert"), [{k: v for k, v in tiny_batch().items() if k != "labels"}],
                              gradient=True)
