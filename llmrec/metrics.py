"""Full-ranking metrics over the whole catalog: Recall@k, NDCG@k (binary relevance, log2), MRR, coverage@k.

Inputs are a score matrix `scores` float (B, N) (higher is better, `-inf` = cannot recommend), one or more
target item indices per user, and an exclusion set per user (the user's training items). Conventions:

- **Exclusion**: excluded items are removed from the ranking; a target is never excluded, even if it is also
  in the user's history (a repeat consumption stays rankable).
- **Ties are broken against the targets** (pessimistic): an item with the same score as a target ranks ahead
  of it, so a model that gives everything the same score (or `-inf` to a cold target) earns nothing.
  Among several targets of one user, the one with the lower index ranks first. This is one consistent total
  order, so the ranks agree with a real top-k list.
- `rank` is 1-based. Recall@k = (#targets with rank <= k) / #targets. NDCG@k = DCG@k / IDCG@k with
  DCG = sum over targets with rank <= k of 1 / log2(rank + 1), IDCG = sum_{i=1..min(#targets, k)} 1/log2(i+1).
  MRR = 1 / (rank of the best-ranked target), no cutoff. All are averaged over users (each user counts once).
- Coverage@k = |union of the users' top-k lists| / N (finite scores only), over all users seen.
- `recall_ndcg(top, targets, k)`: the same Recall@k / NDCG@k of one user's already-ranked list (the scorer's
  validation, the learning loop's judge, replay).

Everything works on row chunks (`chunk_rows`), so the temporaries stay O(chunk_rows x N) and a 72k x 2.4k
evaluation runs in bounded memory; `RankingMetrics` accumulates over batches so the caller never holds the
full (users x items) score matrix either.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "RankingMetrics",
    "bootstrap_ci",
    "compute_metrics",
    "coverage_at_k",
    "metric_names",
    "mrr",
    "ndcg_at_k",
    "recall_at_k",
    "recall_ndcg",
    "target_ranks",
    "topk_indices",
]

Targets = np.ndarray | Sequence[int | np.ndarray | Sequence[int]]
Exclude = np.ndarray | Sequence[np.ndarray | Sequence[int]] | None

DEFAULT_KS = (10, 20)
DEFAULT_COVERAGE_K = 10


def metric_names(ks: Sequence[int] = DEFAULT_KS, coverage_k: int = DEFAULT_COVERAGE_K) -> list[str]:
    """Keys of `RankingMetrics.result()` in report order: recall@k..., ndcg@k..., mrr, coverage@k."""
    return [f"recall@{k}" for k in ks] + [f"ndcg@{k}" for k in ks] + ["mrr", f"coverage@{coverage_k}"]


def target_ranks(
    scores: np.ndarray, targets: Targets, exclude: Exclude = None, chunk_rows: int = 1024
) -> list[np.ndarray]:
    """1-based rank of every target among the user's non-excluded items (ties against the target).

    Args:
        scores: float (B, N); NaN is refused, -inf allowed.
        targets: (B,) int array, or a length-B sequence of ints / int arrays (one or more targets per user).
        exclude: None, bool (B, N) mask (True = excluded), or a length-B sequence of index arrays.
        chunk_rows: rows processed at once (bounds temporary memory to ~chunk_rows x N).

    Returns:
        list of B int64 arrays; element b has one rank per target of user b, in the order given.
    """
    rows, ranks, lengths = _flat_ranks(scores, targets, exclude, chunk_rows)
    return np.split(ranks, np.cumsum(lengths)[:-1])


def topk_indices(
    scores: np.ndarray, k: int, exclude: Exclude = None, chunk_rows: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k item indices per row, best first, excluded items removed.

    Returns:
        (idx int64 (B, k), top_scores float32 (B, k)); rows with fewer than k rankable items are padded with
        -inf scores (their indices are then meaningless); ties broken by lower item index.
    """
    scores = _check_scores(scores)
    n_rows, n_items = scores.shape
    if not 1 <= k:
        raise ValueError(f"k must be >= 1, got {k}")
    _check_exclude(exclude, n_rows, n_items)
    kk = min(k, n_items)
    idx_out = np.zeros((n_rows, k), dtype=np.int64)
    sc_out = np.full((n_rows, k), -np.inf, dtype=np.float32)
    for start in range(0, n_rows, chunk_rows):
        stop = min(start + chunk_rows, n_rows)
        s = scores[start:stop].astype(np.float32, copy=True)
        s[~_valid_mask(exclude, start, stop, n_items)] = -np.inf
        part = (
            np.argpartition(-s, kk - 1, axis=1)[:, :kk]
            if kk < n_items
            else np.tile(np.arange(n_items), (len(s), 1))
        )
        ps = np.take_along_axis(s, part, axis=1)
        order = np.lexsort((part, -ps), axis=1)  # score desc, then index asc
        idx_out[start:stop, :kk] = np.take_along_axis(part, order, axis=1)
        sc_out[start:stop, :kk] = np.take_along_axis(ps, order, axis=1)
    return idx_out, sc_out


class RankingMetrics:
    """Accumulates per-user metrics over score batches; `result()` gives the metrics.json entry.

    Example::

        acc = RankingMetrics(n_items=5)
        acc.update(np.array([[0.9, 0.1, 0.5, 0.3, 0.2]]), targets=[2], exclude=[[0]])
        acc.result()["mrr"]  # 1.0: item 0 is excluded, so item 2 ranks first
    """

    def __init__(
        self, n_items: int, ks: Sequence[int] = DEFAULT_KS, coverage_k: int = DEFAULT_COVERAGE_K
    ) -> None:
        if n_items < 1:
            raise ValueError(f"n_items must be >= 1, got {n_items}")
        self.n_items, self.ks, self.coverage_k = int(n_items), tuple(int(k) for k in ks), int(coverage_k)
        self._sums = {
            name: 0.0 for name in metric_names(self.ks, self.coverage_k) if not name.startswith("coverage")
        }
        self._covered = np.zeros(self.n_items, dtype=bool)
        self.n_users = 0
        self._per_user: dict[str, list[np.ndarray]] = {"rank": [], **{f"ndcg@{k}": [] for k in self.ks}}

    def update(self, scores: np.ndarray, targets: Targets, exclude: Exclude = None) -> None:
        """Add one batch: scores (B, N), B users' targets and exclusions (see `target_ranks`)."""
        if scores.ndim != 2 or scores.shape[1] != self.n_items:
            raise ValueError(f"scores must be (B, {self.n_items}), got shape {scores.shape}")
        rows, ranks, lengths = _flat_ranks(scores, targets, exclude)  # (P,), (P,), (B,)
        n_b = len(lengths)
        r = ranks.astype(np.float64)
        for k in self.ks:
            hit = r <= k
            self._sums[f"recall@{k}"] += float((np.bincount(rows, hit, minlength=n_b) / lengths).sum())
            dcg = np.bincount(rows, np.where(hit, 1.0 / np.log2(r + 1.0), 0.0), minlength=n_b)
            ideal = np.cumsum(1.0 / np.log2(np.arange(2, k + 2)))  # (k,) IDCG by number of targets
            per = dcg / ideal[np.minimum(lengths, k) - 1]  # (B,)
            self._sums[f"ndcg@{k}"] += float(per.sum())
            self._per_user[f"ndcg@{k}"].append(per)
        starts = np.r_[0, np.cumsum(lengths)[:-1]]
        best = np.minimum.reduceat(r, starts)  # (B,) rank of each user's best-ranked target
        self._sums["mrr"] += float((1.0 / best).sum())
        self._per_user["rank"].append(best.astype(np.int64))
        idx, top = topk_indices(scores, self.coverage_k, exclude)
        self._covered[idx[np.isfinite(top)]] = True
        self.n_users += n_b

    def per_user(self, name: str) -> np.ndarray:
        """Per-user values in update order: "rank" (1-based rank of the user's best target, int64) or
        "ndcg@k" for a k of this accumulator (float64); their mean is `result()[name]` for ndcg."""
        if name not in self._per_user:
            raise ValueError(f"unknown per-user metric {name!r}; choose from {list(self._per_user)}")
        parts = self._per_user[name]
        return np.concatenate(parts) if parts else np.zeros(0)

    def result(self) -> dict[str, float]:
        """Means over users (keys from `metric_names`); NaN for every metric when no user was added."""
        n = self.n_users
        res = {name: (v / n if n else float("nan")) for name, v in self._sums.items()}
        res[f"coverage@{self.coverage_k}"] = float(self._covered.sum()) / self.n_items if n else float("nan")
        return {name: float(res[name]) for name in metric_names(self.ks, self.coverage_k)}


def bootstrap_ci(
    values: np.ndarray,
    reference: np.ndarray | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-user `values` (paired with `reference`: of the mean of
    values - reference, users resampled together), e.g. NDCG@10 of each test user."""
    v = np.asarray(values, dtype=np.float64)
    if reference is not None:
        ref = np.asarray(reference, dtype=np.float64)
        if ref.shape != v.shape:
            raise ValueError(f"paired bootstrap needs equal shapes, got {v.shape} and {ref.shape}")
        v = v - ref
    if len(v) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    for b in range(0, n_boot, 100):  # 100 resamples at a time: bounded memory for large test sets
        m = min(100, n_boot - b)
        means[b : b + m] = v[rng.integers(0, len(v), size=(m, len(v)))].mean(1)
    a = (1.0 - level) / 2
    return float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def compute_metrics(
    scores: np.ndarray,
    targets: Targets,
    exclude: Exclude = None,
    ks: Sequence[int] = DEFAULT_KS,
    coverage_k: int = DEFAULT_COVERAGE_K,
) -> dict[str, float]:
    """All metrics for one score matrix (B, N); see the module docstring for definitions."""
    acc = RankingMetrics(np.asarray(scores).shape[1], ks, coverage_k)
    acc.update(scores, targets, exclude)
    return acc.result()


def recall_ndcg(top: np.ndarray, targets: np.ndarray, k: int) -> tuple[float, float]:
    """(recall@k, ndcg@k) of one user's ranked list: the definitions above, for a list already ranked.

    Args:
        top: (L,) the user's recommendations, best first (item indices or ids); only top[:k] counts.
        targets: (T,) the user's target items, same kind as `top`.
        k: cutoff.

    Returns:
        recall@k = hits / T; ndcg@k with binary gains 1 / log2(position + 2) (position 0-based), ideal DCG
        over min(T, k) hits; (0.0, 0.0) when T = 0.
    """
    if len(targets) == 0:
        return 0.0, 0.0
    hits = np.isin(top[:k], targets)
    dcg = float((hits / np.log2(np.arange(2, len(hits) + 2))).sum())
    idcg = float((1.0 / np.log2(np.arange(2, min(len(targets), k) + 2))).sum())
    return float(hits.sum()) / len(targets), dcg / idcg


def recall_at_k(scores: np.ndarray, targets: Targets, k: int, exclude: Exclude = None) -> float:
    """Mean over users of (#targets ranked <= k) / #targets."""
    return compute_metrics(scores, targets, exclude, ks=(k,))[f"recall@{k}"]


def ndcg_at_k(scores: np.ndarray, targets: Targets, k: int, exclude: Exclude = None) -> float:
    """Mean over users of binary-relevance NDCG@k with a log2 discount."""
    return compute_metrics(scores, targets, exclude, ks=(k,))[f"ndcg@{k}"]


def mrr(scores: np.ndarray, targets: Targets, exclude: Exclude = None) -> float:
    """Mean over users of 1 / rank of the best-ranked target (full ranking, no cutoff)."""
    return compute_metrics(scores, targets, exclude)["mrr"]


def coverage_at_k(scores: np.ndarray, k: int, exclude: Exclude = None) -> float:
    """Share of the N catalog items that appear (with a finite score) in at least one user's top-k."""
    scores = _check_scores(scores)
    idx, top = topk_indices(scores, k, exclude)
    covered = np.zeros(scores.shape[1], dtype=bool)
    covered[idx[np.isfinite(top)]] = True
    return float(covered.mean())


# ----------------------------------------------------------------------------------------------- helpers


def _check_scores(scores: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be a 2-D (users, items) array, got shape {scores.shape}")
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float32)
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN; a model must give -inf (not NaN) to items it cannot score")
    return scores


def _flat_ranks(
    scores: np.ndarray, targets: Targets, exclude: Exclude, chunk_rows: int = 1024
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row (P,), rank (P,), targets per row (B,)) for all P (row, target) pairs, grouped by row in order."""
    scores = _check_scores(scores)
    n_rows, n_items = scores.shape
    cols_all, lengths = _normalize_targets(targets, n_rows, n_items)
    _check_exclude(exclude, n_rows, n_items)
    rows_all = np.repeat(np.arange(n_rows, dtype=np.int64), lengths)
    offsets = np.r_[0, np.cumsum(lengths)]
    ranks = np.empty(len(cols_all), dtype=np.int64)
    for start in range(0, n_rows, chunk_rows):
        stop = min(start + chunk_rows, n_rows)
        p0, p1 = offsets[start], offsets[stop]
        s = scores[start:stop]  # (C, N)
        valid = _valid_mask(exclude, start, stop, n_items)  # (C, N) True = competes with the targets
        rows, cols = rows_all[p0:p1] - start, cols_all[p0:p1]
        valid[rows, cols] = False  # targets are never excluded, and are ordered among themselves below
        t_scores = s[rows, cols]  # (P,)
        for q in range(0, len(rows), chunk_rows):  # (P, N) temporaries, P ~ C
            r, ts = rows[q : q + chunk_rows], t_scores[q : q + chunk_rows]
            ranks[p0 + q : p0 + q + len(r)] = ((s[r] >= ts[:, None]) & valid[r]).sum(axis=1) + 1
        for b in np.flatnonzero(lengths[start:stop] > 1) + start:  # users with several targets
            a, e = offsets[b] - p0, offsets[b + 1] - p0
            ts_b, idx_b = t_scores[a:e], cols[a:e]
            better = (ts_b[None, :] > ts_b[:, None]) | (
                (ts_b[None, :] == ts_b[:, None]) & (idx_b[None, :] < idx_b[:, None])
            )  # higher score first, then lower index
            ranks[p0 + a : p0 + e] += better.sum(axis=1)
    return rows_all, ranks, lengths


def _normalize_targets(targets: Targets, n_rows: int, n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """(flat int64 target indices (P,), targets per row (B,)) after checking them."""
    if isinstance(targets, np.ndarray) and targets.ndim == 1 and targets.dtype != object:
        if not np.issubdtype(targets.dtype, np.integer):
            raise ValueError(f"targets must be integer item indices, got dtype {targets.dtype}")
        tgt = [targets]
        lengths = np.ones(len(targets), dtype=np.int64)
    else:
        tgt = [np.atleast_1d(np.asarray(t)) for t in targets]
        lengths = np.array([len(t) for t in tgt], dtype=np.int64)
        for b, t in enumerate(tgt):
            if len(t) == 0:
                raise ValueError(
                    f"user row {b} has no target; drop users without a test event before scoring"
                )
            if not np.issubdtype(t.dtype, np.integer):
                raise ValueError(f"targets must be integer item indices, got dtype {t.dtype} for row {b}")
            if len(t) > 1 and len(np.unique(t)) != len(t):
                raise ValueError(
                    f"duplicate target indices in row {b}: {t.tolist()}; de-duplicate the test items"
                )
    if len(lengths) != n_rows:
        raise ValueError(
            f"got {len(lengths)} target entries for {n_rows} score rows; pass one entry per user"
        )
    flat = np.concatenate(tgt).astype(np.int64) if len(tgt) else np.zeros(0, dtype=np.int64)
    bad = (flat < 0) | (flat >= n_items)
    if bad.any():
        b = int(np.repeat(np.arange(n_rows), lengths)[np.argmax(bad)])
        raise ValueError(f"target index out of range [0, {n_items}) in row {b}: {flat[np.argmax(bad)]}")
    return flat, lengths


def _check_exclude(exclude: Exclude, n_rows: int, n_items: int) -> None:
    if exclude is None:
        return
    if isinstance(exclude, np.ndarray) and exclude.dtype == bool:
        if exclude.shape != (n_rows, n_items):
            raise ValueError(f"exclude mask must be ({n_rows}, {n_items}), got {exclude.shape}")
        return
    if len(exclude) != n_rows:
        raise ValueError(f"got {len(exclude)} exclude entries for {n_rows} score rows; pass one per user")


def _valid_mask(exclude: Exclude, start: int, stop: int, n_items: int) -> np.ndarray:
    valid = np.ones((stop - start, n_items), dtype=bool)
    if exclude is None:
        return valid
    if isinstance(exclude, np.ndarray) and exclude.dtype == bool:
        valid &= ~exclude[start:stop]
        return valid
    ex = [np.asarray(exclude[b], dtype=np.int64).ravel() for b in range(start, stop)]
    cols = np.concatenate(ex) if ex else np.zeros(0, dtype=np.int64)
    if len(cols) and (cols.min() < 0 or cols.max() >= n_items):
        raise ValueError(f"exclude index out of range [0, {n_items}) in rows {start}..{stop - 1}")
    valid[np.repeat(np.arange(stop - start), [len(e) for e in ex]), cols] = False
    return valid
