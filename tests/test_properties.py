"""Property tests (hypothesis) of PageRank, CKA and selection."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hifi_fast
from hifi_fast import ops
from hifi_fast.selecting.pagerank import pagerank
from hifi_fast.heads import HeadScores

SETTINGS = settings(max_examples=40, deadline=None)


def _graph(seed, layers, heads):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(layers, heads, heads, generator=g, dtype=torch.float64)
    a = a * (torch.rand(layers, heads, heads, generator=g, dtype=torch.float64) > 0.3)  # sparse, maybe empty columns
    return (a + a.transpose(1, 2)) / 2, torch.rand(layers, heads, generator=g, dtype=torch.float64)


@SETTINGS
@given(seed=st.integers(0, 10_000), layers=st.integers(1, 4), heads=st.integers(1, 9), damping=st.floats(0.0, 0.95))
def test_pagerank_is_a_distribution_and_permutation_equivariant(seed, layers, heads, damping):
    corr, teleport = _graph(seed, layers, heads)
    scores = pagerank(corr, teleport, damping)
    torch.testing.assert_close(scores.sum(-1), torch.ones(layers, dtype=torch.float64))
    assert torch.all(scores >= 0)
    perm = torch.randperm(heads, generator=torch.Generator().manual_seed(seed))
    permuted = pagerank(corr[:, perm][:, :, perm], teleport[:, perm], damping)
    torch.testing.assert_close(permuted, scores[:, perm], rtol=1e-8, atol=1e-10)


def _cka(ctx, mask):
    return ops.cka_from_cross(ops.head_grams(ctx, mask)[1])


@SETTINGS
@given(seed=st.integers(0, 10_000), tokens=st.integers(2, 12), heads=st.integers(1, 4), dim=st.integers(1, 6), pad=st.integers(0, 5))
def test_cka_symmetric_bounded_rotation_and_padding_invariant(seed, tokens, heads, dim, pad):
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randn(1, tokens, heads, dim, generator=g, dtype=torch.float64).float()
    mask = torch.ones(1, tokens)
    cka = _cka(ctx, mask)
    torch.testing.assert_close(cka, cka.transpose(1, 2))
    assert torch.all((cka >= 0) & (cka <= 1 + 1e-5))
    rotation = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))[0].float()
    rotated = ctx.clone()
    rotated[:, :, 0] = ctx[:, :, 0] @ rotation
    torch.testing.assert_close(_cka(rotated, mask), cka, rtol=1e-4, atol=1e-5)
    padded = torch.cat([ctx, torch.randn(1, pad, heads, dim, generator=g) * 100], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(1, pad)], dim=1)
    torch.testing.assert_close(_cka(padded, padded_mask), cka, rtol=1e-5, atol=1e-6)


@SETTINGS
@given(
    seed=st.integers(0, 10_000), layers=st.integers(1, 4), heads=st.integers(1, 8), data=st.data(),
    score=st.sampled_from(["pagerank", "richness", "correlation", "random"]), selection=st.sampled_from(["per_layer", "global"]),
)
def test_selection_returns_k_distinct_in_range_heads(seed, layers, heads, data, score, selection):
    k = data.draw(st.integers(1, heads))
    corr, richness = _graph(seed, layers, heads)
    scores = HeadScores(richness, corr, pagerank(corr, richness), num_examples=1)
    sel = hifi_fast.select_heads(scores, hifi_fast.HiFiConfig(heads_per_layer=k, score=score, selection=selection, seed=seed))
    assert sel.num_heads == k * layers
    for layer, chosen in sel.heads.items():
        assert 0 <= layer < layers and chosen == sorted(set(chosen)) and all(0 <= h < heads for h in chosen)
        if selection == "per_layer":
            assert len(chosen) == k
