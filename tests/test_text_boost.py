"""choose_text_boost: the per-history-length text boost picked from per-user validation NDCG."""

from __future__ import annotations

import numpy as np
import pytest

from llmrec.scorer.finalize import TEXT_BOOST_Z, TIE_REL, choose_text_boost, largest_tied, tied_with_best

GRID = [1.0, 2.0, 4.0]


def _bucket_scores(n: int, boost2_shift: tuple[float, float]) -> np.ndarray:
    """(3, n) NDCG: boost 1 scores 0.5 for everyone; boost 2 alternates 0.5 + a / 0.5 + b; boost 4 is 0.3."""
    a, b = boost2_shift
    per = np.full((3, n), 0.5)
    per[1] = 0.5 + np.where(np.arange(n) % 2 == 0, a, b)
    per[2] = 0.3
    return per


def test_the_largest_boost_not_worse_at_the_tolerance_wins():
    # boost 2 vs the best (boost 1): paired diff mean -0.008 (1.6% of 0.5), sd 0.058, 100 users: SE 0.0058
    per = _bucket_scores(100, (0.05, -0.066))
    diff = per[1] - per[0]
    se = diff.std(ddof=1) / np.sqrt(100)
    assert -1.96 * se <= diff.mean() < -1.0 * se  # hand check of the planted case
    bucket = np.zeros(100, dtype=int)
    assert TEXT_BOOST_Z == 1.96 and TIE_REL == 0.02
    boost, measured = choose_text_boost(per, bucket, GRID, n_buckets=2, min_users=30)
    assert boost == (2.0, 2.0) and measured == [True, False]  # boost 4 is 0.2 worse with sd 0: never a tie
    # under the one-standard-error rule the same data keep boost 1
    assert choose_text_boost(per, bucket, GRID, n_buckets=2, min_users=30, z=1.0)[0] == (1.0, 1.0)


def test_buckets_without_validation_users_take_the_nearest_measured_one():
    # only bucket 2 (e.g. histories of 3-4 events, as in 5-core data) is measured; there boost 4 is best
    per = np.vstack([np.full(50, 0.1), np.full(50, 0.2), np.full(50, 0.4)])
    bucket = np.full(50, 2)
    boost, measured = choose_text_boost(per, bucket, GRID, n_buckets=5, min_users=30)
    assert measured == [False, False, True, False, False]
    assert boost == (4.0,) * 5  # shorter histories get at least its text, longer ones keep it
    # nothing measured: no boost anywhere
    assert choose_text_boost(per, np.full(50, 2), GRID, n_buckets=5, min_users=60)[0] == (1.0,) * 5


def test_longer_histories_never_get_more_text_than_shorter_measured_ones():
    short = _bucket_scores(100, (0.05, -0.066))  # picks 2
    long_ = np.vstack([np.full(40, 0.1), np.full(40, 0.2), np.full(40, 0.4)])  # alone it would pick 4
    per = np.hstack([short, long_])
    bucket = np.r_[np.zeros(100, int), np.full(40, 3)]
    boost, measured = choose_text_boost(per, bucket, GRID, n_buckets=4, min_users=30)
    assert measured == [True, False, False, True]
    assert boost == (2.0, 2.0, 2.0, 2.0)


def test_a_score_table_of_the_wrong_shape_is_refused():
    with pytest.raises(ValueError, match=r"per must be \(len\(grid\)=3, users=4\)"):
        choose_text_boost(np.zeros((2, 4)), np.zeros(4, int), GRID, n_buckets=2)


def test_a_noisy_small_bucket_does_not_buy_text_with_a_large_loss():
    """Wide standard errors alone would call a 20% loss a tie; the relative bound refuses it."""
    rng = np.random.default_rng(0)
    best = (rng.random(40) < 0.5).astype(float)  # NDCG 1 or 0: very noisy per user
    worse = best * (rng.random(40) < 0.8)  # loses a fifth of the hits
    per = np.vstack([best, worse])
    diff = worse - best
    assert diff.mean() >= -1.96 * diff.std(ddof=1) / np.sqrt(40)  # within the standard errors
    assert worse.mean() < 0.98 * best.mean()
    assert largest_tied(per, [1.0, 2.0]) == 1.0
    assert largest_tied(per, [1.0, 2.0], rel=1.0) == 2.0  # without the relative bound it would be taken


def test_tied_with_best_by_hand():
    """Rows 0-3 against the best row 1 (mean 0.6), 5 users: row 0 is 0.2 lower at one user (mean paired
    difference -0.04, standard error 0.04: within 1.96 of them, but 0.56 < 0.98 x 0.6 -> not tied); row 2
    is 0.01 lower at one user (tied: within both bounds); row 3 is far below (not tied)."""
    best = np.array([1.0, 1.0, 0.5, 0.5, 0.0])
    per = np.vstack([best - [0.2, 0, 0, 0, 0], best, best - [0, 0, 0.01, 0, 0], best * 0.1])
    np.testing.assert_array_equal(tied_with_best(per), [False, True, True, False])
    np.testing.assert_array_equal(tied_with_best(per, rel=0.1), [True, True, True, False])
    assert largest_tied(per, [1.0, 2.0, 3.0, 4.0]) == 3.0
