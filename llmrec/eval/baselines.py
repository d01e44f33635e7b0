"""Strong baselines, each a `llmrec.protocol.Recommender` scoring the whole catalog.

- `PopularityRecommender` ("popularity"): train interaction count per item, the same list for everyone.
- `ItemKNNRecommender` ("itemknn"): cosine item-item similarity of the binary user x item train matrix
  (optionally shrunk), pruned to the `n_neighbors` most similar items per item; a user's score = sum of the
  rows of its history.
- `ALSRecommender` ("als"): implicit-feedback ALS from the `implicit` package (CPU, seeded). Item factors come
  from `implicit`; a user's factor is re-solved from its history with the exact ALS normal equations
  (the same equations implicit uses), so users and histories unseen in fit are handled without refitting.
- `BPRRecommender` ("bpr"): implicit's BPR matrix factorisation (single-threaded, seeded).
- `EASERecommender` ("ease"): Steck's closed-form item-item model (l2 regularisation).
- `SASRecRecommender` ("sasrec", in `llmrec.eval.sasrec`): ID-only SASRec at reference settings, full-softmax
  loss, early stopping on a validation set.
- `ServedTextRecommender` ("served_text", in llmrec.eval.served_text): the model `llmrec serve` ranks with
  when it serves no scorer (the state's MeanVectorizer + serving's push-down of negatives), untuned; the
  serve-or-not rule compares the scorer with it.
- `ZeroShotTextRecommender` ("zeroshot_text"): recency-weighted mean of the history's text vectors,
  cosine against `ItemSpace.text_vectors`; no training.

Hyper-parameters are tuned by `llmrec.eval.tuning` (grids there); the defaults here are single settings.

Conventions (all models):
- Events of kind "dislike" and "skip" are not positive: ID models neither fit on them nor read them in a
  history; zero-shot text gives them a negative weight. Every other kind (view, click, like, purchase,
  rating, any rating value) counts as a positive implicit interaction.
- The ID-based models (popularity, itemknn, als, bpr, ease, sasrec) give `-inf` to items never seen in train
  (cold items): they cannot recommend them. Only text-based models can.
- Scores are float32 (B, N) in `ItemSpace` order; ties are allowed (metrics break them against targets).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import pandas as pd
import scipy.sparse as sp

from llmrec.cooc import history_matrix, spd_inverse, top_per_row
from llmrec.protocol import History, ItemSpace
from llmrec.schema import EVENT, ITEM_IDX, NEGATIVE_KINDS, USER_ID

logger = logging.getLogger(__name__)

__all__ = [
    "ALSRecommender",
    "BASELINES",
    "BPRRecommender",
    "EASERecommender",
    "ID_MODELS",
    "ItemKNNRecommender",
    "NEGATIVE_EVENTS",
    "NewFirstTextRecommender",
    "PopularityRecommender",
    "SASRecRecommender",  # noqa: F822 (module __getattr__ below: it lives in llmrec.eval.sasrec)
    "ZeroShotTextRecommender",
    "cocounts",
    "knn_from_cocounts",
    "make_baseline",
    "shrunk_cosine_similarity",
]

NEGATIVE_EVENTS = NEGATIVE_KINDS  # the one definition lives in llmrec.schema


class _IDModel:
    """Shared fit bookkeeping: positive train events, known-item mask, history filtering."""

    name = "id_model"

    def _prepare(self, train: pd.DataFrame, items: ItemSpace) -> pd.DataFrame:
        if ITEM_IDX not in train.columns:
            raise ValueError(
                f"{self.name}: train must carry an int64 `{ITEM_IDX}` column (index into ItemSpace)"
            )
        pos = train if EVENT not in train.columns else train[~train[EVENT].isin(NEGATIVE_EVENTS)]
        if len(pos) == 0:
            raise ValueError(f"{self.name}: no positive train events to fit on (got {len(train)} events)")
        idx = pos[ITEM_IDX].to_numpy()
        if idx.min() < 0 or idx.max() >= items.n_items:
            raise ValueError(f"{self.name}: item_idx out of range [0, {items.n_items})")
        self.n_items = items.n_items
        self.known = np.zeros(items.n_items, dtype=bool)  # (N,) seen in train
        self.known[idx] = True
        return pos

    def _history_items(self, h: History) -> np.ndarray:
        keep = ~np.isin(h.event, NEGATIVE_EVENTS) if len(h.event) else np.zeros(0, dtype=bool)
        idx = h.item_idx[keep]
        return idx[self.known[idx]]  # oldest first, only items the model knows

    def _mask_cold(self, scores: np.ndarray) -> np.ndarray:
        scores[:, ~self.known] = -np.inf
        return scores


class PopularityRecommender(_IDModel):
    """Most-interacted train items first, identical for every user; cold items -inf."""

    name = "popularity"

    def fit(self, train: pd.DataFrame, items: ItemSpace) -> None:
        pos = self._prepare(train, items)
        self.counts = np.bincount(pos[ITEM_IDX].to_numpy(), minlength=items.n_items).astype(
            np.float32
        )  # (N,)
        logger.info("popularity: %d events over %d items", len(pos), int(self.known.sum()))

    def score(self, histories: list[History]) -> np.ndarray:
        scores = np.tile(self.counts, (len(histories), 1))  # (B, N)
        return self._mask_cold(scores)


class ItemKNNRecommender(_IDModel):
    """Cosine item-item kNN over binary train histories, with optional shrinkage.

    sim(i, j) = |U_i & U_j| / (sqrt(|U_i| |U_j|) + shrink), diagonal zeroed, top `n_neighbors` per item kept;
    score(u, j) = sum_{i in history(u)} sim(i, j). With shrink 0 the matrix equals the scorer's co-occurrence
    similarity (`llmrec.cooc.cooccurrence_similarity`; tests/test_tuning.py checks it).
    """

    name = "itemknn"
    shares_fit_cache = True  # `Tuned` lends it one dict across a grid (the co-counts are computed once)

    def __init__(self, n_neighbors: int = 100, shrink: float = 0.0, block_items: int = 1024) -> None:
        if shrink < 0:
            raise ValueError(f"itemknn: shrink must be >= 0, got {shrink}")
        self.n_neighbors, self.shrink, self.block_items = n_neighbors, float(shrink), block_items

    def fit(self, train: pd.DataFrame, items: ItemSpace) -> None:
        pos = self._prepare(train, items)
        key = (id(train), len(train))  # the co-counts of one train frame serve every grid point (Tuned)
        cache = getattr(self, "fit_cache", None)
        if cache is not None and cache.get("key") == key:
            co, norms = cache["cocounts"]
        else:
            users, idx = pos[USER_ID].astype(str).to_numpy(), pos[ITEM_IDX].to_numpy(np.int64)
            co, norms = cocounts(users, idx, items.n_items)
            if cache is not None:
                cache.update(key=key, cocounts=(co, norms))
        self.sim = knn_from_cocounts(co, norms, self.n_neighbors, self.shrink, self.block_items)  # (N, N)

    def score(self, histories: list[History]) -> np.ndarray:
        h = history_matrix([self._history_items(h) for h in histories], self.n_items)  # (B, N) sparse
        scores = np.asarray((h @ self.sim).todense(), dtype=np.float32)  # (B, N)
        return self._mask_cold(scores)


class EASERecommender(_IDModel):
    """EASE (Steck, WWW 2019): a closed-form item-item linear model with a zero diagonal.

    With X the binary (users x known items) train matrix and P = (X^T X + l2 I)^-1, the weights are
    B = I - P diag(1 / diag(P)) (so B_jj = 0); score(u) = x_u B. When there are fewer users U than items K the
    inverse is taken through the Woodbury identity, P = (I - X^T (l2 I_U + X X^T)^-1 X) / l2, which costs a
    (U, U) solve instead of a (K, K) one (MovieLens: 610 users x 9.7k items). Cold items score -inf.
    """

    name = "ease"

    def __init__(self, l2: float = 500.0) -> None:
        if l2 <= 0:
            raise ValueError(f"ease: l2 must be > 0, got {l2}")
        self.l2 = float(l2)

    def fit(self, train: pd.DataFrame, items: ItemSpace) -> None:
        t0 = time.perf_counter()
        pos = self._prepare(train, items)
        self.cols = np.flatnonzero(self.known)  # (K,) catalog index of each column of B
        col_of = np.full(items.n_items, -1, np.int64)
        col_of[self.cols] = np.arange(len(self.cols))
        self.col_of = col_of
        codes, _ = pd.factorize(pos[USER_ID].astype(str))
        x = sp.csr_matrix(
            (np.ones(len(pos), np.float64), (codes, col_of[pos[ITEM_IDX].to_numpy(np.int64)])),
            shape=(int(codes.max()) + 1, len(self.cols)),
        )
        x.sum_duplicates()
        x.data[:] = 1.0
        u, k = x.shape
        if u < k:
            xd = x.toarray()  # (U, K)
            m = np.linalg.solve(self.l2 * np.eye(u) + xd @ xd.T, xd)  # (U, K)
            p = (xd.T.astype(np.float32) @ m.astype(np.float32))  # (K, K) = X^T (l2 I + X X^T)^-1 X
            p *= -1.0
            p[np.diag_indices(k)] += 1.0
            p /= self.l2
        else:
            g = (x.T @ x).toarray()  # (K, K) Gram matrix
            g[np.diag_indices(k)] += self.l2
            p = spd_inverse(g).astype(np.float32)
        b = p / (-np.diag(p))[None, :]  # B_ij = -P_ij / P_jj
        b[np.diag_indices(k)] = 0.0
        self.b = b.astype(np.float32)  # (K, K)
        logger.info("ease: %d users x %d items, l2 %g (%s, %.1fs)", u, k, self.l2,
                    "Woodbury" if u < k else "direct inverse", time.perf_counter() - t0)

    def score(self, histories: list[History]) -> np.ndarray:
        cols = [self.col_of[self._history_items(h)] for h in histories]
        h = history_matrix(cols, len(self.cols))  # (B, K) binary
        out = np.full((len(histories), self.n_items), -np.inf, dtype=np.float32)
        out[:, self.cols] = np.asarray(h @ self.b, dtype=np.float32)  # (B, K)
        return out


class ALSRecommender(_IDModel):
    """Implicit ALS (`implicit.als.AlternatingLeastSquares`, CPU); user factors re-solved from histories.

    Confidence of an observed (user, item) is `alpha` (implicit's convention: C = alpha * R with binary R,
    unobserved cells weigh 1); user factor u = (Y^T Y + reg I + sum_h (c-1) y_h y_h^T)^-1 sum_h c y_h.
    """

    name = "als"

    def __init__(
        self,
        factors: int = 64,
        regularization: float = 0.05,
        alpha: float = 10.0,
        iterations: int = 15,
        seed: int = 0,
        num_threads: int = 0,
    ) -> None:
        self.factors, self.regularization, self.alpha = factors, regularization, alpha
        self.iterations, self.seed, self.num_threads = iterations, seed, num_threads

    def fit(self, train: pd.DataFrame, items: ItemSpace) -> None:
        from llmrec.optional import require

        AlternatingLeastSquares = require("implicit.als", "the ALS baseline").AlternatingLeastSquares

        t0 = time.perf_counter()
        pos = self._prepare(train, items)
        ui = pos[[USER_ID, ITEM_IDX]].drop_duplicates()
        self.user_codes, uniques = pd.factorize(ui[USER_ID])
        self.user_index = {u: i for i, u in enumerate(uniques)}
        user_items = sp.csr_matrix(
            (np.ones(len(ui), dtype=np.float32), (self.user_codes, ui[ITEM_IDX].to_numpy())),
            shape=(len(uniques), items.n_items),
        )  # (U, N)
        from threadpoolctl import threadpool_limits

        with threadpool_limits(1, "blas"):  # implicit parallelises itself; a BLAS pool on top only thrashes
            self.model = AlternatingLeastSquares(
                factors=self.factors,
                regularization=self.regularization,
                alpha=self.alpha,
                iterations=self.iterations,
                random_state=self.seed,
                num_threads=self.num_threads,
                use_gpu=False,
            )
            self.model.fit(user_items, show_progress=False)
        self.item_factors = np.asarray(self.model.item_factors, dtype=np.float64)  # (N, F)
        self.yty = self.item_factors.T @ self.item_factors  # (F, F)
        logger.info(
            "als: %d users x %d items, %d factors, %d iterations (%.1fs)",
            len(uniques),
            int(self.known.sum()),
            self.factors,
            self.iterations,
            time.perf_counter() - t0,
        )

    def user_factors(self, histories: list[History]) -> np.ndarray:
        """(B, F) float64 ALS user factors solved from each history's known positive items."""
        f = self.item_factors.shape[1]
        out = np.zeros((len(histories), f))
        base = self.yty + self.regularization * np.eye(f)
        c = self.alpha
        for b, h in enumerate(histories):
            idx = np.unique(self._history_items(h))
            if len(idx) == 0:
                continue
            y = self.item_factors[idx]  # (L, F)
            out[b] = np.linalg.solve(base + (c - 1.0) * (y.T @ y), c * y.sum(axis=0))
        return out

    def score(self, histories: list[History]) -> np.ndarray:
        scores = (self.user_factors(histories) @ self.item_factors.T).astype(np.float32)  # (B, N)
        return self._mask_cold(scores)


class BPRRecommender(_IDModel):
    """Bayesian personalised ranking (`implicit.bpr.BayesianPersonalizedRanking`, CPU, seeded).

    Users are the train users (BPR has no closed-form fold-in): a history's user is looked up by user_id;
    a user unseen in fit gets no opinion (all known items tie at 0). The item bias implicit learns is part of
    the score (implicit appends it as a factor with a constant 1 on the user side). `num_threads=1` keeps the
    stochastic updates in one order, so a seed gives one result (implicit's multi-threaded BPR does not).
    """

    name = "bpr"

    def __init__(
        self,
        factors: int = 64,
        learning_rate: float = 0.01,
        regularization: float = 0.01,
        iterations: int = 100,
        seed: int = 0,
        num_threads: int = 1,
    ) -> None:
        self.factors, self.learning_rate, self.regularization = factors, learning_rate, regularization
        self.iterations, self.seed, self.num_threads = iterations, seed, num_threads

    def fit(self, train: pd.DataFrame, items: ItemSpace) -> None:
        from implicit.bpr import BayesianPersonalizedRanking

        t0 = time.perf_counter()
        pos = self._prepare(train, items)
        ui = pos[[USER_ID, ITEM_IDX]].drop_duplicates()
        codes, uniques = pd.factorize(ui[USER_ID].astype(str))
        self.user_index = {u: i for i, u in enumerate(uniques)}
        user_items = sp.csr_matrix(
            (np.ones(len(ui), dtype=np.float32), (codes, ui[ITEM_IDX].to_numpy())),
            shape=(len(uniques), items.n_items),
        )  # (U, N)
        from threadpoolctl import threadpool_limits

        with threadpool_limits(1, "blas"):
            model = BayesianPersonalizedRanking(
                factors=self.factors, learning_rate=self.learning_rate, regularization=self.regularization,
                iterations=self.iterations, random_state=self.seed, num_threads=self.num_threads,
                use_gpu=False,
            )
            model.fit(user_items, show_progress=False)
        self.user_factors = np.asarray(model.user_factors, dtype=np.float32)  # (U, F+1)
        self.item_factors = np.asarray(model.item_factors, dtype=np.float32)  # (N, F+1)
        logger.info("bpr: %d users x %d items, %d factors, %d iterations (%.1fs)", len(uniques),
                    int(self.known.sum()), self.factors, self.iterations, time.perf_counter() - t0)

    def score(self, histories: list[History]) -> np.ndarray:
        u = np.zeros((len(histories), self.user_factors.shape[1]), np.float32)
        for b, h in enumerate(histories):
            row = self.user_index.get(str(h.user_id))
            if row is not None:
                u[b] = self.user_factors[row]
        return self._mask_cold(u @ self.item_factors.T)  # (B, N)


class ZeroShotTextRecommender:
    """Cosine between a recency-weighted mean of the history's text vectors and every item's text vector.

    Weight of the l-th most recent event (l = 0 newest) is 0.5 ** (l / half_life); dislike/skip events get the
    negative of that weight. No training; cold items are scored like any other item.
    """

    name = "zeroshot_text"

    def __init__(self, half_life: float = 10.0, max_len: int = 200) -> None:
        self.half_life, self.max_len = half_life, max_len

    def fit(self, train: pd.DataFrame, items: ItemSpace) -> None:
        vecs = np.asarray(items.text_vectors, dtype=np.float32)
        if vecs.ndim != 2 or len(vecs) != items.n_items:
            raise ValueError(f"zeroshot_text: text_vectors must be (N={items.n_items}, D), got {vecs.shape}")
        self.vectors = vecs  # (N, D)

    def user_vectors(self, histories: list[History]) -> np.ndarray:
        """(B, D) float32 L2-normalised user vectors (zeros for an empty history)."""
        out = np.zeros((len(histories), self.vectors.shape[1]), dtype=np.float32)
        for b, h in enumerate(histories):
            idx = h.item_idx[-self.max_len :]
            if len(idx) == 0:
                continue
            age = np.arange(len(idx) - 1, -1, -1, dtype=np.float64)  # 0 = newest
            w = 0.5 ** (age / self.half_life)
            ev = h.event[-self.max_len :]
            w = np.where(np.isin(ev, NEGATIVE_EVENTS), -w, w)
            u = (w[:, None] * self.vectors[idx]).sum(axis=0)
            n = np.linalg.norm(u)
            out[b] = u / n if n > 0 else 0.0
        return out

    def score(self, histories: list[History]) -> np.ndarray:
        return (self.user_vectors(histories) @ self.vectors.T).astype(np.float32)  # (B, N)


class NewFirstTextRecommender(ZeroShotTextRecommender):
    """Zero-shot text with every item that has no train event ranked above every item that has one: the
    reference for a model that knows the next item is new (the cold protocol, where llmrec makes its cold-item
    choice on items held out of its training, `llmrec.eval.cold_choice`). Within each group: the cosine."""

    name = "zeroshot_text_new"

    def fit(self, train: pd.DataFrame, items: ItemSpace) -> None:
        super().fit(train, items)
        self.new = np.ones(items.n_items, dtype=bool)
        self.new[np.unique(train[ITEM_IDX].to_numpy(dtype=np.int64))] = False

    def score(self, histories: list[History]) -> np.ndarray:
        s = super().score(histories)
        s[:, self.new] += np.float32(4.0)  # cosines lie in [-1, 1]: +4 puts every new item above the rest
        return s


def _sasrec(seed: int, **kwargs: object) -> object:
    from llmrec.eval.sasrec import SASRecRecommender  # torch: imported only when SASRec is asked for

    return SASRecRecommender(seed=seed, **kwargs)


def _served_text(seed: int, **kwargs: object) -> object:
    from llmrec.eval.served_text import ServedTextRecommender  # the serving fallback, as it serves

    return ServedTextRecommender(**kwargs)


# The one table of baselines: metrics.json name -> factory(seed, **constructor kwargs). `BASELINES` (and so
# `llmrec.eval.models.ALL_MODELS` and `llmrec evaluate --models`) is its keys in this order.
_FACTORIES: dict[str, Callable[..., object]] = {
    "popularity": lambda seed, **kw: PopularityRecommender(),
    "itemknn": lambda seed, **kw: ItemKNNRecommender(**kw),
    "als": lambda seed, **kw: ALSRecommender(seed=seed, **kw),
    "bpr": lambda seed, **kw: BPRRecommender(seed=seed, **kw),
    "ease": lambda seed, **kw: EASERecommender(**kw),
    "sasrec": _sasrec,
    "zeroshot_text": lambda seed, **kw: ZeroShotTextRecommender(**kw),
    "served_text": _served_text,
    "zeroshot_text_new": lambda seed, **kw: NewFirstTextRecommender(**kw),
}
BASELINES = tuple(_FACTORIES)
ID_MODELS = ("als", "bpr", "ease", "sasrec")  # candidates of the "best ID model + item-kNN" hybrid


def make_baseline(name: str, seed: int = 0, **kwargs: object) -> object:
    """A fresh baseline by its metrics.json name (one of `BASELINES`); kwargs go to its constructor."""
    if name not in _FACTORIES:
        raise ValueError(f"unknown baseline {name!r}; choose from {list(BASELINES)}")
    return _FACTORIES[name](seed, **kwargs)




def shrunk_cosine_similarity(
    users: np.ndarray,
    items: np.ndarray,
    n_items: int,
    n_neighbors: int,
    shrink: float,
    block_items: int = 1024,
) -> sp.csr_matrix:
    """float32 (N, N) CSR: |U_i & U_j| / (sqrt(|U_i| |U_j|) + shrink), diagonal 0, top n_neighbors per row.

    users: (E,) user key per positive event; items: (E,) int catalog index; repeats of a pair count once.
    """
    co, norms = cocounts(users, items, n_items)
    return knn_from_cocounts(co, norms, n_neighbors, shrink, block_items)


def cocounts(users: np.ndarray, items: np.ndarray, n_items: int) -> tuple[sp.csr_matrix, np.ndarray]:
    """(C float32 (N, N) CSR with C_ij = |U_i & U_j|, norms float32 (N,) = sqrt(|U_i|)) of binary events."""
    codes = pd.factorize(pd.Series(users).astype(str))[0] if len(users) else np.zeros(0, np.int64)
    x = sp.csr_matrix((np.ones(len(items), np.float32), (codes, np.asarray(items, np.int64))),
                      shape=(int(codes.max()) + 1 if len(codes) else 0, n_items))
    x.sum_duplicates()
    x.data[:] = 1.0
    co = (x.T.tocsr() @ x).tocsr()  # (N, N)
    return co, np.sqrt(np.asarray(x.sum(axis=0)).ravel()).astype(np.float32)


def knn_from_cocounts(
    co: sp.csr_matrix, norms: np.ndarray, n_neighbors: int, shrink: float, block_items: int = 1024
) -> sp.csr_matrix:
    """float32 (N, N) CSR: C_ij / (norms_i norms_j + shrink), diagonal 0, the n_neighbors largest per row."""
    n_items = co.shape[0]
    k = min(n_neighbors, n_items - 1)
    rows, cols, vals = [], [], []
    for start in range(0, n_items, block_items):
        stop = min(start + block_items, n_items)
        if k <= 0:
            break
        with np.errstate(divide="ignore", invalid="ignore"):
            sim = co[start:stop].toarray() / (norms[start:stop, None] * norms[None, :] + shrink)  # (b, N)
        sim = np.nan_to_num(sim, nan=0.0, posinf=0.0)
        sim[np.arange(stop - start), np.arange(start, stop)] = 0.0
        r, c, v = top_per_row(sim, k)
        rows.append(start + r)
        cols.append(c)
        vals.append(v)
    def cat(parts: list[np.ndarray], dt: type) -> np.ndarray:
        return np.concatenate(parts).astype(dt) if parts else np.zeros(0, dt)

    return sp.csr_matrix((cat(vals, np.float32), (cat(rows, np.int64), cat(cols, np.int64))),
                         shape=(n_items, n_items))


def __getattr__(name: str) -> object:  # SASRec lives in llmrec.eval.sasrec; still importable from here
    if name == "SASRecRecommender":
        from llmrec.eval.sasrec import SASRecRecommender

        return SASRecRecommender
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
