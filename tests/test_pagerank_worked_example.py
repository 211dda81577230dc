"""PageRank (DESIGN §1.4, ``score="pagerank"``) pinned to a 3-head example worked out by hand in
exact fractions, independent of the package's iteration; and the one reading of the paper's method
that a secondary source gives (richness only as the starting vector ``P(0)`` of PageRank, see
``docs/paper_comparison.md``) shown to rank exactly as ``score="correlation"``.

The example. Heads 0, 1, 2 with mean CKA ``R[0,1] = 1/2``, ``R[0,2] = 1/5``, ``R[1,2] = 1/10`` and
richness ``I = (1, 2, 1)``. Without self loops the columns of ``W`` sum to ``7/10``, ``3/5``,
``3/10``, so

    P = [[0,   5/6, 2/3],        v = I / 4 = (1/4, 1/2, 1/4)
         [5/7, 0,   1/3],
         [2/7, 1/6, 0  ]]

With ``d = 1/2`` the fixed point of ``s = (1 - d) v + d P s`` solves ``(2 I - P) s = v``:

    2 s0 - 5/6 s1 - 2/3 s2 = 1/4
    -5/7 s0 + 2 s1 - 1/3 s2 = 1/2
    -2/7 s0 - 1/6 s1 + 2 s2 = 1/4

whose solution is ``s = (287/776, 81/194, 165/776)`` (it sums to 1). With a uniform teleport
``v = (1/3, 1/3, 1/3)`` the same system gives ``s = (77/194, 34/97, 49/194)``. The two forms rank
different heads first: head 1 (richness teleport) and head 0 (uniform).
"""
from fractions import Fraction

import pytest
import torch

import hifi_fast
from hifi_fast.selecting.pagerank import pagerank
from hifi_fast.heads import HeadScores

R01, R02, R12 = 0.5, 0.2, 0.1
CORRELATION = torch.tensor([[1.0, R01, R02], [R01, 1.0, R12], [R02, R12, 1.0]], dtype=torch.float64)
RICHNESS = torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64)
RICHNESS_TELEPORT = [Fraction(287, 776), Fraction(81, 194), Fraction(165, 776)]
UNIFORM_TELEPORT = [Fraction(77, 194), Fraction(34, 97), Fraction(49, 194)]


def _check_hand_solution(solution, teleport):
    """The fractions above satisfy the hand-written system (so a typo in them cannot hide)."""
    p = [[0, Fraction(5, 6), Fraction(2, 3)], [Fraction(5, 7), 0, Fraction(1, 3)], [Fraction(2, 7), Fraction(1, 6), 0]]
    for i in range(3):
        assert 2 * solution[i] - sum(p[i][j] * solution[j] for j in range(3)) == teleport[i]
    assert sum(solution) == 1


def _as_tensor(fractions):
    return torch.tensor([float(f) for f in fractions], dtype=torch.float64)


def _scores(damping=0.5):
    corr, rich = CORRELATION[None], RICHNESS[None]
    return HeadScores(rich, corr, pagerank(corr, rich, damping), num_examples=1, damping=damping, params_per_head=1)


def test_hand_fractions_solve_the_system():
    _check_hand_solution(RICHNESS_TELEPORT, [Fraction(1, 4), Fraction(1, 2), Fraction(1, 4)])
    _check_hand_solution(UNIFORM_TELEPORT, [Fraction(1, 3)] * 3)


def test_pagerank_with_richness_teleport_equals_hand_solution():
    got = pagerank(CORRELATION[None], RICHNESS[None], damping=0.5)[0]
    torch.testing.assert_close(got, _as_tensor(RICHNESS_TELEPORT), rtol=0, atol=1e-10)


def test_uniform_teleport_equals_hand_solution():
    got = pagerank(CORRELATION[None], None, damping=0.5)[0]
    torch.testing.assert_close(got, _as_tensor(UNIFORM_TELEPORT), rtol=0, atol=1e-10)


def test_selection_by_each_form():
    scores = _scores()
    pick = lambda score: hifi_fast.select_heads(scores, hifi_fast.HiFiConfig(heads_per_layer=1, score=score, damping=0.5)).heads
    assert pick("pagerank") == {0: [1]}
    assert pick("correlation") == {0: [0]}
    assert pick("richness") == {0: [1]}


@pytest.mark.parametrize("damping", [0.5, 0.85])
def test_fixed_point_equals_closed_form(damping):
    """``s = (1 - d) (I - d P)^-1 v``, solved directly (no iteration), with P built in the test."""
    weights = CORRELATION.clone().fill_diagonal_(0.0)
    transition = weights / weights.sum(dim=0, keepdim=True)
    v = RICHNESS / RICHNESS.sum()
    closed = (1 - damping) * torch.linalg.solve(torch.eye(3, dtype=torch.float64) - damping * transition, v)
    torch.testing.assert_close(pagerank(CORRELATION[None], RICHNESS[None], damping)[0], closed, rtol=0, atol=1e-9)


@pytest.mark.parametrize("damping", [0.5, 0.85])
def test_richness_as_starting_vector_only_ranks_as_correlation(damping):
    """Standard PageRank ``p(t+1) = (1 - d)/N + d M p(t)`` started from ``p(0) = I / sum(I)``: for
    ``d < 1`` the iteration contracts to one fixed point whatever it starts from, so the start
    (the richness) leaves no trace and the result is ``score="correlation"``'s."""
    weights = CORRELATION.clone().fill_diagonal_(0.0)
    transition = weights / weights.sum(dim=0, keepdim=True)
    for start in (RICHNESS / RICHNESS.sum(), torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)):
        p = start.clone()
        for _ in range(500):
            p = (1 - damping) / 3 + damping * transition @ p
        torch.testing.assert_close(p, pagerank(CORRELATION[None], None, damping)[0], rtol=0, atol=1e-9)
