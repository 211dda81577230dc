"""Scoring (DESIGN §1.2-1.4) against the float64 reference, padding invariance and bad input."""
import torch

import hifi_fast
from conftest import tiny_batch, tiny_model
from reference import score_reference


def _batches():
    return [tiny_batch(seed=1), tiny_batch(seed=2, batch=3, tokens=7, pad_rows={0: 2, 2: 5})]


def test_scores_match_float64_reference(family):
    model = tiny_model(family)
    batches = _batches()
    scores = hifi_fast.score_heads(model, batches)
    richness, corr, pr = score_reference(model, family, batches)
    assert scores.num_examples == 7
    torch.testing.assert_close(scores.richness, richness, rtol=1e-4, atol=0)
    torch.testing.assert_close(scores.correlation, corr, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(scores.pagerank, pr, rtol=1e-4, atol=0)


def test_padding_does_not_change_statistics(family):
    model = tiny_model(family)
    short = tiny_batch(seed=3, tokens=9, pad_rows={1: 6, 3: 2})
    long = {k: v.clone() for k, v in short.items()}
    extra = 6
    long["input_ids"] = torch.cat([short["input_ids"], torch.zeros(4, extra, dtype=torch.long)], dim=1)
    long["attention_mask"] = torch.cat([short["attention_mask"], torch.zeros(4, extra, dtype=torch.long)], dim=1)
    a = hifi_fast.score_heads(model, [short])
    b = hifi_fast.score_heads(model, [long])
    for name in ("richness", "correlation", "pagerank"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-5, atol=1e-7)


def test_num_examples_cuts_the_stream_and_restores_mode():
    model = tiny_model("bert").train()
    batches = _batches()
    scores = hifi_fast.score_heads(model, batches, num_examples=5)
    assert scores.num_examples == 5
    assert model.training
    richness, _, _ = score_reference(model.eval(), "bert", [{k: v[:5] for k, v in batches[0].items()}, {k: v[:1] for k, v in batches[1].items()}])
    torch.testing.assert_close(scores.richness, richness, rtol=1e-4, atol=0)


def test_shapes_and_invariants():
    model = tiny_model("llama")
    scores = hifi_fast.score_heads(model, _batches())
    num_layers, num_heads = 3, 6
    assert scores.richness.shape == (num_layers, num_heads)
    assert scores.correlation.shape == (num_layers, num_heads, num_heads)
    torch.testing.assert_close(scores.correlation, scores.correlation.transpose(1, 2))
    assert torch.all(scores.correlation.diagonal(dim1=1, dim2=2) == 1)
    assert torch.all((scores.correlation >= 0) & (scores.correlation <= 1 + 1e-6))
    torch.testing.assert_close(scores.pagerank.sum(-1), torch.ones(num_layers, dtype=torch.float64))
    assert torch.all(scores.richness > 0)


def test_distilbert_is_supported():
    model = tiny_model("distilbert")
    batch = tiny_batch()
    del batch["labels"]
    scores = hifi_fast.score_heads(model, [batch])
    richness, corr, _ = score_reference(model, "distilbert", [batch])
    torch.testing.assert_close(scores.richness, richness, rtol=1e-4, atol=0)
    torch.testing.assert_close(scores.correlation, corr, rtol=1e-4, atol=1e-6)


