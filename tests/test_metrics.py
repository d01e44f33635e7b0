"""Metrics against hand-computed values and a brute-force sort reference."""

from __future__ import annotations

import math

import numpy as np
import pytest

from llmrec.metrics import (
    RankingMetrics,
    compute_metrics,
    coverage_at_k,
    metric_names,
    mrr,
    ndcg_at_k,
    recall_at_k,
    recall_ndcg,
    target_ranks,
    topk_indices,
)


def test_perfect_ranking_scores_one() -> None:
    scores = np.eye(4, dtype=np.float32)  # user b likes item b best
    m = compute_metrics(scores, np.arange(4), ks=(1, 2))
    assert m["recall@1"] == 1.0 and m["ndcg@1"] == 1.0 and m["mrr"] == 1.0
    assert m["coverage@10"] == 1.0  # every item is someone's recommendation


def test_no_hit_scores_zero() -> None:
    scores = np.tile(np.arange(10, dtype=np.float32), (3, 1))  # item 9 best, item 0 worst
    assert recall_at_k(scores, np.zeros(3, dtype=np.int64), 5) == 0.0
    assert ndcg_at_k(scores, np.zeros(3, dtype=np.int64), 5) == 0.0
    assert mrr(scores, np.zeros(3, dtype=np.int64)) == pytest.approx(1 / 10)  # rank 10 of 10


def test_worked_dcg_example_with_exclusion() -> None:
    # ranking by score: 0, 1, 2, 3, 4, 5; item 0 is in the user's history, so it is removed:
    # 1 (rank 1), 2 (rank 2), 3 (3), 4 (4), 5 (5); targets 2 and 5 sit at ranks 2 and 5.
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4]], dtype=np.float32)
    targets, exclude = [np.array([2, 5])], [np.array([0])]
    assert target_ranks(scores, targets, exclude)[0].tolist() == [2, 5]
    m = compute_metrics(scores, targets, exclude, ks=(3, 5))
    idcg = 1 + 1 / math.log2(3)
    assert m["recall@3"] == pytest.approx(0.5)
    assert m["ndcg@3"] == pytest.approx((1 / math.log2(3)) / idcg)  # = 0.38685
    assert m["ndcg@3"] == pytest.approx(0.386853, abs=1e-6)
    assert m["recall@5"] == pytest.approx(1.0)
    assert m["ndcg@5"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(6)) / idcg)
    assert m["mrr"] == pytest.approx(0.5)
    # without the exclusion item 0 takes rank 1 and everything moves down one
    assert target_ranks(scores, targets)[0].tolist() == [3, 6]


def test_target_is_never_excluded_and_ties_go_against_targets() -> None:
    scores = np.array([[1.0, 1.0, 1.0, 0.0]], dtype=np.float32)
    # target 0 is also in the history: still ranked; items 1 and 2 tie with it and rank ahead
    assert target_ranks(scores, [0], [np.array([0, 3])])[0].tolist() == [3]
    const = np.zeros((2, 50), dtype=np.float32)
    assert recall_at_k(const, np.array([0, 1]), 10) == 0.0  # a constant model earns nothing
    cold = np.array([[0.5, -np.inf, 0.1, 0.2]], dtype=np.float32)
    assert target_ranks(cold, [1])[0].tolist() == [4]  # -inf target ranks last


def test_multiple_targets_of_one_user_rank_consistently() -> None:
    scores = np.array([[0.5, 0.5, 0.9, 0.1]], dtype=np.float32)
    r = target_ranks(scores, [np.array([1, 0])])[0]
    assert r.tolist() == [3, 2]  # 2 first, then targets tied at 0.5: lower index (0) first
    assert recall_at_k(scores, [np.array([1, 0])], 2) == pytest.approx(0.5)


def _reference_ranks(s: np.ndarray, tgt: np.ndarray, ex: np.ndarray) -> list[int]:
    """Sort explicitly: score desc, non-targets before targets on ties, then index."""
    keep = [j for j in range(len(s)) if j not in set(ex.tolist()) or j in set(tgt.tolist())]
    order = sorted(keep, key=lambda j: (-s[j], j in set(tgt.tolist()), j))
    return [order.index(t) + 1 for t in tgt]


def test_ranks_match_brute_force_sort_and_chunking() -> None:
    rng = np.random.default_rng(0)
    n_users, n_items = 40, 30
    scores = rng.integers(0, 6, size=(n_users, n_items)).astype(np.float32)  # many ties on purpose
    scores[rng.random(scores.shape) < 0.1] = -np.inf
    targets = [rng.choice(n_items, size=rng.integers(1, 4), replace=False) for _ in range(n_users)]
    exclude = [rng.choice(n_items, size=rng.integers(0, 8), replace=False) for _ in range(n_users)]
    got = target_ranks(scores, targets, exclude, chunk_rows=7)
    for b in range(n_users):
        assert got[b].tolist() == _reference_ranks(scores[b], targets[b], exclude[b])
    mask = np.zeros((n_users, n_items), dtype=bool)
    for b, e in enumerate(exclude):
        mask[b, e] = True
    assert [r.tolist() for r in target_ranks(scores, targets, mask)] == [r.tolist() for r in got]
    # batched accumulation == one shot
    acc = RankingMetrics(n_items)
    for s0 in range(0, n_users, 9):
        acc.update(scores[s0 : s0 + 9], targets[s0 : s0 + 9], exclude[s0 : s0 + 9])
    one = compute_metrics(scores, targets, exclude)
    assert acc.result() == pytest.approx(one)
    assert list(one) == metric_names()


def test_topk_and_coverage() -> None:
    scores = np.array([[0.1, 0.9, 0.8, -np.inf], [0.7, 0.6, 0.5, 0.4]], dtype=np.float32)
    idx, top = topk_indices(scores, 2, [np.array([1]), np.array([])])
    assert idx.tolist() == [[2, 0], [0, 1]]
    assert coverage_at_k(scores, 2, [np.array([1]), np.array([])]) == pytest.approx(3 / 4)
    idx, top = topk_indices(scores, 4, [np.array([1]), np.array([])])
    assert np.isinf(top[0, 2:]).all()  # only 2 finite, rankable items for user 0


def test_bad_input_is_refused_clearly() -> None:
    with pytest.raises(ValueError, match="NaN"):
        compute_metrics(np.array([[np.nan, 1.0]]), np.array([0]))
    with pytest.raises(ValueError, match="out of range"):
        compute_metrics(np.zeros((1, 3)), np.array([3]))
    with pytest.raises(ValueError, match="target entries"):
        compute_metrics(np.zeros((2, 3)), np.array([0]))
    with pytest.raises(ValueError, match="no target"):
        compute_metrics(np.zeros((1, 3)), [np.array([], dtype=np.int64)])


def test_bootstrap_interval_covers_the_mean_and_paired_differences():
    """The percentile bootstrap interval of a mean brackets it and shrinks with more users; a paired interval
    of identical per-user values is exactly [0, 0], of a constant shift exactly that shift."""
    from llmrec.metrics import bootstrap_ci

    rng = np.random.default_rng(0)
    small, large = rng.random(50), rng.random(5000)
    lo_s, hi_s = bootstrap_ci(small)
    lo_l, hi_l = bootstrap_ci(large)
    assert lo_s < small.mean() < hi_s and lo_l < large.mean() < hi_l
    assert (hi_l - lo_l) < (hi_s - lo_s) / 5  # ~ 1/sqrt(100) of the width
    assert bootstrap_ci(small, small) == (0.0, 0.0)
    lo, hi = bootstrap_ci(small + 0.25, small)
    assert lo == pytest.approx(0.25) and hi == pytest.approx(0.25)


def test_recall_ndcg_of_a_ranked_list_by_hand_and_as_the_score_matrix_metrics() -> None:
    # top list [4, 1, 3, 0], targets {1, 0, 7}: hits at positions 1 and 3 (0-based) within k = 4
    r, n = recall_ndcg(np.array([4, 1, 3, 0, 2]), np.array([1, 0, 7]), k=4)
    assert r == pytest.approx(2 / 3)
    idcg = 1 + 1 / math.log2(3) + 1 / math.log2(4)  # min(3 targets, k) = 3 ideal hits
    assert n == pytest.approx((1 / math.log2(3) + 1 / math.log2(5)) / idcg)
    assert recall_ndcg(np.array(["a", "b"]), np.array(["b"]), k=1) == (0.0, 0.0)  # ids work; b is past k
    assert recall_ndcg(np.array(["a", "b"]), np.array(["b"]), k=2)[1] == pytest.approx(1 / math.log2(3))
    assert recall_ndcg(np.array([1, 2]), np.array([], dtype=np.int64), k=2) == (0.0, 0.0)
    # the same figures as the score-matrix metrics when the list is that matrix's top-k (no ties)
    rng = np.random.default_rng(0)
    scores = rng.random((6, 20)).astype(np.float32)
    targets = [rng.choice(20, size=t, replace=False) for t in (1, 2, 3, 1, 4, 2)]
    per = [recall_ndcg(np.argsort(-scores[b])[:5], targets[b], 5) for b in range(6)]
    m = compute_metrics(scores, targets, ks=(5,))
    assert np.mean([x[0] for x in per]) == pytest.approx(m["recall@5"])
    assert np.mean([x[1] for x in per]) == pytest.approx(m["ndcg@5"])

