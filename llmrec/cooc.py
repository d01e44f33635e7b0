"""Item co-occurrence matrices (the behaviour term of the scorer's ranking), shared by the scorer and the
item-kNN baseline.

Two kinds, both built from the item x item co-occurrence counts G = X^T X of the binary user x item matrix X
of positive events (`CoocCounts`), both (N, N) CSR with the `n_neighbors` largest positive entries per row:
- **item-kNN** (term name "itemknn"): sim(i, j) = |U_i & U_j| / sqrt(|U_i| |U_j|) (U_i = the users who
  interacted with item i), diagonal zeroed;
- **EASE** (term names "ease:l2=<lambda>", `ease_term`): the closed-form item weights of Steck (WWW 2019),
  `ease_weights`; needs a dense inverse over the items with events, so it is built only for catalogs of at
  most `EASE_MAX_ITEMS` items.
A user's score for item j is sum over the distinct items i of its history of M(i, j) (`history_scores`).

Pure numpy / scipy.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import numpy as np
import scipy.sparse as sp

logger = logging.getLogger(__name__)

ITEMKNN = "itemknn"
# EASE regularisation strengths: the scorer's behaviour terms tried on validation and the EASE baseline's grid
EASE_L2_GRID = (1.0, 10.0, 50.0, 200.0, 500.0, 2000.0)
# largest catalog for which EASE is built: a dense float64 inverse over the items with events (2 GiB at 16k,
# about 15 s per inverse at 9.7k items on 2 cores by Cholesky, `spd_inverse`; 25 s by LU)
EASE_MAX_ITEMS = 16384


def spd_inverse(a: np.ndarray) -> np.ndarray:
    """The inverse of a symmetric positive definite float64 (K, K) matrix (EASE's G + l2 I), by Cholesky
    (LAPACK potrf + potri: about half the flops of `np.linalg.inv`'s LU; MovieLens' K = 9,724 items on 2
    cores: 15.4 s vs 25.2 s, EASE's B equal within 5e-16 of its largest entry). `a` is not modified. A
    matrix that is not positive definite in floating point (potrf fails) is inverted by LU instead, with a
    warning.

    Returns:
        float64 (K, K), symmetric.
    """
    from scipy.linalg import lapack

    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"spd_inverse needs a square matrix, got shape {a.shape}")
    c, info = lapack.dpotrf(np.asarray(a, np.float64), lower=False, clean=False, overwrite_a=False)
    if info == 0:
        p, info = lapack.dpotri(c, lower=False, overwrite_c=True)
    if info != 0:
        logger.warning("Cholesky of a %d x %d matrix failed (LAPACK info %d): inverting it by LU",
                       *a.shape, info)
        return np.linalg.inv(a)
    p = np.triu(p)  # potri fills the upper triangle; the lower holds the factor's leftovers
    p += np.triu(p, 1).T
    return p


def ease_term(l2: float) -> str:
    """The term name of EASE with regularisation l2 ("ease:l2=50")."""
    return f"ease:l2={float(l2):g}"


def candidate_terms(kind: str, n_items: int) -> list[str]:
    """The behaviour terms a scorer tries on validation for `TrainConfig.cooc_kind` (the first wins ties).

    "itemknn" -> item-kNN; "ease" -> EASE at every `EASE_L2_GRID` value; "auto" -> item-kNN, plus the EASE
    terms when the catalog has at most `EASE_MAX_ITEMS` items.

    Raises:
        ValueError: an unknown kind, or "ease" for a catalog larger than EASE_MAX_ITEMS.
    """
    ease = [ease_term(x) for x in EASE_L2_GRID]
    if kind == ITEMKNN:
        return [ITEMKNN]
    if kind == "ease":
        if n_items > EASE_MAX_ITEMS:
            raise ValueError(
                f"cooc_kind 'ease' needs a dense inverse over the catalog's items: at most {EASE_MAX_ITEMS} "
                f"items, this catalog has {n_items}; use --cooc-kind itemknn (or auto, which skips EASE here)"
            )
        return ease
    if kind == "auto":
        return [ITEMKNN] + (ease if n_items <= EASE_MAX_ITEMS else [])
    raise ValueError(f"cooc_kind must be one of auto, itemknn, ease; got {kind!r}")


def term_l2(term: str) -> float | None:
    """EASE's l2 of a term name, None for item-kNN.

    Raises:
        ValueError: a name that is neither "itemknn" nor "ease:l2=<number>".
    """
    if term == ITEMKNN:
        return None
    prefix = "ease:l2="
    try:
        if term.startswith(prefix):
            l2 = float(term[len(prefix):])
            if l2 > 0:
                return l2
    except ValueError:
        pass
    raise ValueError(f"a co-occurrence term is 'itemknn' or 'ease:l2=<positive number>', got {term!r}")


def cooccurrence_similarity(
    users: np.ndarray, items: np.ndarray, n_items: int, n_neighbors: int = 100, block_items: int = 1024
) -> sp.csr_matrix:
    """Cosine co-occurrence similarity, top `n_neighbors` per item.

    Args:
        users: int (E,) user code per positive event (any integers; repeats of a (user, item) pair
            count once).
        items: int (E,) catalog index per event, in [0, n_items).
        n_items: N.
        n_neighbors: entries kept per row (the most similar items).
        block_items: rows computed at once (dense (block, N) temporaries only).

    Returns:
        float32 (N, N) CSR, row i = item i's neighbours.
    """
    t0 = time.perf_counter()
    users = np.asarray(users)
    items = np.asarray(items, dtype=np.int64)
    if users.shape != items.shape or users.ndim != 1:
        raise ValueError(f"users and items must be 1-d of equal length, got {users.shape} and {items.shape}")
    x = _binary_user_items(users, items, n_items)
    xt = x.T.tocsr()  # (N, U)
    per_item = np.asarray(x.sum(axis=0)).ravel()  # (N,) users per item
    sim_m = _top_similar(lambda a, b: xt[a:b] @ x, per_item, n_items, n_neighbors, block_items)
    logger.info(
        "co-occurrence: %d users x %d items, %d similarities kept (%.1fs)",
        x.shape[0],
        int((per_item > 0).sum()),
        sim_m.nnz,
        time.perf_counter() - t0,
    )
    return sim_m


def _binary_user_items(users: np.ndarray, items: np.ndarray, n_items: int) -> sp.csr_matrix:
    """float32 (U, N) binary CSR of (user code, item) events; user codes are compacted to 0..U-1.

    Raises:
        ValueError: an item outside [0, n_items).
    """
    if len(items) and (items.min() < 0 or items.max() >= n_items):
        raise ValueError(f"items must lie in [0, {n_items}), got [{items.min()}, {items.max()}]")
    codes = np.unique(users, return_inverse=True)[1].ravel() if len(users) else np.zeros(0, np.int64)
    x = sp.csr_matrix(
        (np.ones(len(items), dtype=np.float32), (codes, items)),
        shape=(int(codes.max()) + 1 if len(codes) else 0, n_items),
    )
    x.sum_duplicates()
    x.data[:] = 1.0  # binary
    return x


class CoocCounts:
    """Item x item co-occurrence counts summed over chunks of users (`add`), for data no process holds whole.

    Memory: the (N, N) count matrix's non-zeros (at most the distinct co-occurring pairs, whatever the number
    of users) plus one chunk of events. `similarity(n_neighbors)` equals `cooccurrence_similarity` over every
    added event, each user added once with all its items (a user added twice counts as two users).
    """

    def __init__(self, n_items: int, chunk_events: int = 1 << 20) -> None:
        self.n_items = int(n_items)
        self.chunk_events = int(chunk_events)
        self.counts = sp.csr_matrix((self.n_items, self.n_items), dtype=np.float32)
        self._users: list[np.ndarray] = []
        self._items: list[np.ndarray] = []
        self._pending = 0
        self._next_user = 0

    def add(self, user_items: Sequence[np.ndarray]) -> None:
        """Add users, each given as the int array of its positive items (repeats count once)."""
        lens = np.fromiter((len(x) for x in user_items), np.int64, count=len(user_items))
        if not len(lens):
            return
        self._users.append(np.repeat(np.arange(self._next_user, self._next_user + len(lens)), lens))
        self._items.append(np.concatenate([np.asarray(x, np.int64) for x in user_items]))
        self._next_user += len(lens)
        self._pending += int(lens.sum())
        if self._pending >= self.chunk_events:
            self._flush()

    def _flush(self) -> None:
        if not self._users:
            return
        x = _binary_user_items(np.concatenate(self._users), np.concatenate(self._items), self.n_items)
        self.counts = (self.counts + (x.T @ x).tocsr()).tocsr()
        self._users, self._items, self._pending = [], [], 0

    def similarity(self, n_neighbors: int = 100, block_items: int = 1024) -> sp.csr_matrix:
        """The top-`n_neighbors` cosine co-occurrence similarity (`cooccurrence_similarity`'s definition)."""
        self._flush()
        c = self.counts
        return _top_similar(lambda a, b: c[a:b], c.diagonal(), self.n_items, n_neighbors, block_items)

    def matrix(self, term: str, n_neighbors: int = 100) -> sp.csr_matrix:
        """The named behaviour term ("itemknn" or `ease_term(l2)`) over every added user."""
        l2 = term_l2(term)
        if l2 is None:
            return self.similarity(n_neighbors)
        self._flush()
        return ease_weights(self.counts, l2, n_neighbors)


def ease_weights(counts: sp.spmatrix, l2: float, n_neighbors: int = 100) -> sp.csr_matrix:
    """EASE item weights (Steck, WWW 2019) from co-occurrence counts, the `n_neighbors` largest per row.

    Over the K items with events (counts' diagonal > 0): P = (G + l2 I)^-1, B_ij = -P_ij / P_jj, B_jj = 0,
    the weights of `llmrec.eval.baselines.EASERecommender` fit on the same events; row i holds what item i in
    a history adds to every item's score. Items without events have no entries. Only positive entries are kept
    (the top-k of a row never reaches a negative one while it has k positive ones).

    Args:
        counts: (N, N) G = X^T X of a binary user x item matrix X (`CoocCounts.counts`).
        l2: regularisation, > 0.
        n_neighbors: entries kept per row.

    Returns:
        float32 (N, N) CSR.

    Raises:
        ValueError: l2 <= 0, or N > EASE_MAX_ITEMS (the dense inverse would not fit).
    """
    n = counts.shape[0]
    if not l2 > 0:
        raise ValueError(f"EASE l2 must be > 0, got {l2}")
    if n > EASE_MAX_ITEMS:
        raise ValueError(f"EASE needs a dense inverse: at most {EASE_MAX_ITEMS} items, got {n}")
    t0 = time.perf_counter()
    counts = sp.csr_matrix(counts)
    known = np.flatnonzero(counts.diagonal() > 0)  # (K,)
    kk = len(known)
    k = min(n_neighbors, kk - 1)
    if k <= 0:
        return sp.csr_matrix((n, n), dtype=np.float32)
    g = counts[known][:, known].toarray().astype(np.float64)  # (K, K)
    g[np.diag_indices(kk)] += l2
    p = spd_inverse(g)
    del g
    b = (p / (-np.diag(p))[None, :]).astype(np.float32)  # (K, K) B_ij = -P_ij / P_jj
    del p
    b[np.diag_indices(kk)] = 0.0
    r, c, v = top_per_row(b, k)
    out = sp.csr_matrix((v, (known[r], known[c])), shape=(n, n))
    logger.info("EASE l2 %g: %d items, %d weights kept (%.1fs)", l2, kk, out.nnz, time.perf_counter() - t0)
    return out


def _top_similar(
    co_rows: Callable[[int, int], sp.spmatrix], n_users: np.ndarray, n_items: int, n_neighbors: int,
    block_items: int,
) -> sp.csr_matrix:
    """Top-k cosine rows from co-occurrence counts: co_rows(a, b) -> counts of items a..b-1 (b - a, N);
    n_users (N,): users per item (the counts' diagonal)."""
    norms = np.sqrt(np.asarray(n_users, np.float64)).astype(np.float32)  # (N,)
    inv = np.where(norms > 0, 1.0 / np.maximum(norms, 1e-12), 0.0).astype(np.float32)
    rows, cols, vals = [], [], []
    k = min(n_neighbors, n_items - 1)
    for start in range(0, n_items, block_items):
        stop = min(start + block_items, n_items)
        if k <= 0:
            break
        co = co_rows(start, stop).toarray()  # (b, N) co-occurrence counts
        sim = co * inv[start:stop, None] * inv[None, :]
        sim[np.arange(stop - start), np.arange(start, stop)] = 0.0
        r, c, v = top_per_row(sim, k)
        rows.append(start + r)
        cols.append(c)
        vals.append(v)

    def cat(parts: list[np.ndarray], dt: type) -> np.ndarray:
        return np.concatenate(parts).astype(dt) if parts else np.zeros(0, dt)

    return sp.csr_matrix(
        (cat(vals, np.float32), (cat(rows, np.int64), cat(cols, np.int64))), shape=(n_items, n_items)
    )


def top_per_row(block: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The k largest entries of each row of a dense (b, M) block, positive ones only: (row in the block,
    column, value), each (<= b * k,). 0 < k <= M."""
    top = np.argpartition(-block, k - 1, axis=1)[:, :k]  # (b, k)
    tv = np.take_along_axis(block, top, axis=1)
    keep = (tv > 0).ravel()
    return np.repeat(np.arange(block.shape[0]), k)[keep], top.ravel()[keep], tv.ravel()[keep]


def history_matrix(hist_items: Sequence[np.ndarray], n_items: int) -> sp.csr_matrix:
    """float32 (B, N) binary CSR: row b has a 1 at each distinct item of hist_items[b]."""
    rows = (
        np.concatenate([np.full(len(h), b) for b, h in enumerate(hist_items)])
        if len(hist_items)
        else np.zeros(0)
    )
    cols = np.concatenate([np.asarray(h) for h in hist_items]) if len(hist_items) else np.zeros(0)
    m = sp.csr_matrix(
        (np.ones(len(cols), dtype=np.float32), (rows.astype(np.int64), cols.astype(np.int64))),
        shape=(len(hist_items), n_items),
    )
    m.sum_duplicates()
    m.data[:] = 1.0  # repeats count once
    return m


def history_scores(
    sim: sp.csr_matrix,
    hist_items: Sequence[np.ndarray],
    cand: np.ndarray,
    impute: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """float32 (B, K) co-occurrence scores of candidates cand int64 (B, K) for B histories of item indices.

    impute: (idx (N, k), weights (N, k)) from `llmrec.scorer.model.cooc_neighbours`: a candidate without
    co-occurrence data (never seen with another item in training) scores the weighted sum of its text
    neighbours' scores as candidates, so a hybrid ranking does not push cold items down for being cold: a cold
    item scores what the items it reads like would score in its place. A neighbour in the history adds nothing
    of its own (the matrix's diagonal is zero), so a cold near-duplicate of a history item is not lifted above
    what that item's co-occurrences earn (a fixed self-similarity of 1 did that, and on Magazine, where such
    duplicates are other subscription terms of a magazine the user has, it cost validation NDCG with a tenth
    of the items made cold 0.247 -> 0.189).
    """
    cand = np.asarray(cand, dtype=np.int64)
    if cand.ndim != 2 or cand.shape[0] != len(hist_items):
        raise ValueError(f"cand must be (B={len(hist_items)}, K), got {cand.shape}")
    hist_m = history_matrix(hist_items, sim.shape[0])  # (B, N) binary
    full = (hist_m @ sim).tocsr()  # (B, N) sparse
    rows = np.repeat(np.arange(cand.shape[0]), cand.shape[1])
    out = np.asarray(full[rows, cand.ravel()], dtype=np.float32).reshape(cand.shape)
    if impute is not None and out.size:
        nb, w = impute
        cold = ~has_cooc(sim)[cand]  # (B, K) candidates with no co-occurrence data
        if cold.any():
            r, c = np.nonzero(cold)
            nbi = nb[cand[r, c]]  # (m, k)
            rr = np.repeat(r, nbi.shape[1])
            vals = np.asarray(full[rr, nbi.ravel()], dtype=np.float32)
            out[r, c] = (w[cand[r, c]] * vals.reshape(nbi.shape)).sum(1)
    return out


def has_cooc(sim: sp.spmatrix) -> np.ndarray:
    """bool (N,): the item has co-occurrence data (a neighbour, or is some item's neighbour)."""
    return (np.diff(sim.tocsr().indptr) > 0) | (np.diff(sim.tocsc().indptr) > 0)

