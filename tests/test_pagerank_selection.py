"""PageRank (DESIGN §1.4) against an explicit per-layer iteration, and the selection rules (§1.5)."""
import json

import pytest
import torch

import hifi_fast
from hifi_fast.selecting.pagerank import pagerank
from conftest import random_scores
from reference import pagerank_ref


@pytest.mark.parametrize("damping", [0.0, 0.5, 0.85, 0.99])
def test_pagerank_matches_explicit_iteration(damping):
    s = random_scores()
    got = pagerank(s.correlation, s.richness, damping)
    for layer in range(4):
        torch.testing.assert_close(got[layer], pagerank_ref(s.correlation[layer], s.richness[layer], damping), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got.sum(-1), torch.ones(4, dtype=torch.float64))


def test_pagerank_degenerate_graphs():
    corr = torch.zeros(2, 3, 3, dtype=torch.float64)  # no edges: every column uniform
    corr[1, 0, 1] = corr[1, 1, 0] = 1.0  # head 2 isolated
    teleport = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]], dtype=torch.float64)
    got = pagerank(corr, teleport)
    for layer in range(2):
        torch.testing.assert_close(got[layer], pagerank_ref(corr[layer], teleport[layer]), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got[0], torch.full((3,), 1 / 3, dtype=torch.float64))


def test_pagerank_permutation_equivariant():
    s = random_scores()
    perm = torch.tensor([3, 0, 4, 1, 2])
    got = pagerank(s.correlation[:, perm][:, :, perm], s.richness[:, perm])
    torch.testing.assert_close(got, s.pagerank[:, perm], rtol=1e-10, atol=1e-12)


def test_per_layer_top_k_with_ties_to_lower_index():
    s = random_scores(num_layers=2, num_heads=4)
    s.pagerank = torch.tensor([[0.1, 0.3, 0.3, 0.3], [0.4, 0.1, 0.4, 0.1]], dtype=torch.float64)
    sel = hifi_fast.select_heads(s, hifi_fast.HiFiConfig(score="pagerank", heads_per_layer=2))
    assert sel.heads == {0: [1, 2], 1: [0, 2]}


def test_per_layer_selection_is_argmax_of_pagerank():
    s = random_scores()
    sel = hifi_fast.select_heads(s, hifi_fast.HiFiConfig(score="pagerank", heads_per_layer=3))
    for layer, heads in sel.heads.items():
        expected = sorted(sorted(range(5), key=lambda h: (-float(s.pagerank[layer, h]), h))[:3])
        assert heads == expected


def test_global_selection_uses_layer_normalised_scores():
    s = random_scores(num_layers=2, num_heads=3)
    s.pagerank = torch.tensor([[0.5, 0.3, 0.2], [0.9, 0.05, 0.05]], dtype=torch.float64)
    sel = hifi_fast.select_heads(s, hifi_fast.HiFiConfig(score="pagerank", heads_per_layer=1, selection="global"))
    assert sel.heads == {0: [0], 1: [0]}
    # unnormalised, layer 0's large scores would take three of the four places
    s.pagerank = torch.tensor([[4.0, 4.0, 2.0], [0.5, 0.45, 0.05]], dtype=torch.float64)
    sel = hifi_fast.select_heads(s, hifi_fast.HiFiConfig(score="pagerank", heads_per_layer=2, selection="global"))
    assert sel.heads == {0: [0, 1], 1: [0, 1]} and sel.num_heads == 4


def test_score_ablations():
    s = random_scores()
    by_richness = hifi_fast.select_heads(s, hifi_fast.HiFiConfig(heads_per_layer=1, score="richness"))
    assert by_richness.heads == {l: [int(s.richness[l].argmax())] for l in range(4)}
    by_corr = hifi_fast.select_heads(s, hifi_fast.HiFiConfig(heads_per_layer=1, score="correlation"))
    uniform = torch.stack([pagerank_ref(s.correlation[l], None) for l in range(4)])
    assert by_corr.heads == {l: [int(uniform[l].argmax())] for l in range(4)}
    rand = [hifi_fast.select_heads(s, hifi_fast.HiFiConfig(heads_per_layer=2, score="random", seed=seed)).heads for seed in (0, 0, 1)]
    assert rand[0] == rand[1] and rand[0] != rand[2]
    assert all(len(h) == 2 and len(set(h)) == 2 for h in rand[2].values())


def test_damping_is_honoured():
    s = random_scores()
    cfg = hifi_fast.HiFiConfig(score="pagerank", heads_per_layer=1, damping=0.3)
    from hifi_fast.selecting.selection import ranking_scores

    torch.testing.assert_close(ranking_scores(s, cfg), pagerank(s.correlation, s.richness, 0.3))


def test_parameter_budget_derives_k():
    s = random_scores(num_layers=4, num_heads=5, params_per_head=100)
    sel = hifi_fast.select_heads(s, hifi_fast.HiFiConfig(score="pagerank", trainable_param_budget=1250))
    assert all(len(h) == 3 for h in sel.heads.values())
    with pytest.raises(ValueError, match="below one head per layer"):
        hifi_fast.select_heads(s, hifi_fast.HiFiConfig(score="pagerank", trainable_param_budget=399))


def test_selection_json_round_trip():
    s = random_scores()
    sel = hifi_fast.select_heads(s, hifi_fast.HiFiConfig(score="pagerank", heads_per_layer=2))
    back = hifi_fast.HeadSelection.from_json(sel.to_json())
    assert back == sel and back.heads == sel.heads
    torch.testing.assert_close(back.scores.pagerank, s.pagerank)
    assert json.loads(hifi_fast.HeadSelection({2: [3, 1]}).to_json()) == {"heads": {"2": [1, 3]}}




@pytest.mark.parametrize("config", [
    dict(heads_per_layer=1), dict(heads_per_layer=3, seed=7), dict(heads_per_layer=2, selection="global", seed=3),
    dict(trainable_param_budget=1250),
])
def test_random_heads_need_no_scores(config):
    """select_random_heads (no scoring pass) picks what select_heads picks for score='random' from
    any scores of the same geometry, and holds no scores."""
    from hifi_fast.selecting.selection import select_random_heads

    cfg = hifi_fast.HiFiConfig(score="random", **config)
    expected = [hifi_fast.select_heads(random_scores(num_layers=4, num_heads=5, seed=s), cfg) for s in (0, 1)]
    got = select_random_heads(4, 5, 100, cfg)
    assert got == expected[0] == expected[1] and got.scores is None
    with pytest.raises(ValueError, match="it selects for 'random' only"):
        select_random_heads(4, 5, 100, hifi_fast.HiFiConfig(score="pagerank"))


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_patch_with_random_config_runs_no_scoring_pass(family, monkeypatch):
    from conftest import tiny_batch, tiny_model

    cfg = hifi_fast.HiFiConfig(heads_per_layer=2, score="random", seed=5)
    with_batches = hifi_fast.patch(tiny_model(family), cfg, batches=[tiny_batch()]).hifi_state.selection
    monkeypatch.setattr("hifi_fast.selecting.scoring.score_for_config", lambda *a, **k: pytest.fail("scored"))
    model = hifi_fast.patch(tiny_model(family), cfg)  # no batches
    assert model.hifi_state.selection == with_batches and model.hifi_state.selection.scores is None
    model(**tiny_batch()).logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
