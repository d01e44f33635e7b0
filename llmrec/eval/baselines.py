"""Strong baselines, each a `llmrec.eval.protocol.Recommender` scoring the whole catalog.

- `PopularityRecommender` ("popularity"): train interaction count per item, the same list for everyone.
- `ItemKNNRecommender` ("itemknn"): cosine item-item similarity of the binary user x item train matrix,
  pruned to the `n_neighbors` most similar items per item; a user's score = sum of the rows of its history.
- `ALSRecommender` ("als"): implicit-feedback ALS from the `implicit` package (CPU, seeded). Item factors come
  from `implicit`; a user's factor is re-solved from its history with the exact ALS normal equations
  (the same equations implicit uses), so users and histories unseen in fit are handled without refitting.
- `SASRecRecommender` ("sasrec"): ID-only causal self-attention (SASRec-style) in torch, trained in-process
  with sampled softmax (uniform negatives shared by a batch), seeded; CPU by default.
- `ZeroShotTextRecommender` ("zeroshot_text"): recency-weighted mean of the history's text vectors,
  cosine against `ItemSpace.text_vectors`; no training.

Conventions (all models):
- Events of kind "dislike" and "skip" are not positive: ID models neither fit on them nor read them in a
  history; zero-shot text gives them a negative weight. Every other kind (view, click, like, purchase,
  rating, any rating value) counts as a positive implicit interaction.
- The ID-based models (popularity, itemknn, als, sasrec) give `-inf` to items never seen in train (cold
  items): they cannot recommend them. Only text-based models can.
- Scores are float32 (B, N) in `ItemSpace` order; ties are allowed (metrics break them against targets).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pandas as pd
import scipy.sparse as sp

from llmrec.eval.protocol import History, ItemSpace
from llmrec.schema import EVENT, NEGATIVE_KINDS, USER_ID
from llmrec.scorer.cooc import cooccurrence_similarity, history_matrix

logger = logging.getLogger(__name__)

__all__ = [
    "ALSRecommender",
    "BASELINES",
    "ItemKNNRecommender",
    "NEGATIVE_EVENTS",
    "PopularityRecommender",
    "SASRecRecommender",
    "ZeroShotTextRecommender",
    "make_baseline",
]

NEGATIVE_EVENTS = NEGATIVE_KINDS  # the one definition lives in llmrec.schema
ITEM_IDX = "item_idx"


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
    """Cosine item-item kNN over binary train histories.

    sim(i, j) = |U_i & U_j| / sqrt(|U_i| |U_j|), diagonal zeroed, top `n_neighbors` per item kept;
    score(u, j) = sum_{i in history(u)} sim(i, j).
    """

    name = "itemknn"

    def __init__(self, n_neighbors: int = 100, block_items: int = 1024) -> None:
        self.n_neighbors, self.block_items = n_neighbors, block_items

    def fit(self, train: pd.DataFrame, items: ItemSpace) -> None:
        pos = self._prepare(train, items)
        self.sim = cooccurrence_similarity(
            pos[USER_ID].astype(str).to_numpy(),
            pos[ITEM_IDX].to_numpy(np.int64),
            items.n_items,
            self.n_neighbors,
            self.block_items,
        )  # (N, N) sparse

    def score(self, histories: list[History]) -> np.ndarray:
        h = history_matrix([self._history_items(h) for h in histories], self.n_items)  # (B, N) sparse
        scores = np.asarray((h @ self.sim).todense(), dtype=np.float32)  # (B, N)
        return self._mask_cold(scores)


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


class SASRecRecommender(_IDModel):
    """ID-only causal self-attention sequence model (SASRec-style), trained in-process.

    Training windows: every user's positive train sequence is cut into windows of `max_len + 1` items;
    position t predicts item t+1 with a sampled softmax over the true item and `n_negatives` uniform
    negatives shared by the batch. Scoring: the last position's state dotted with every item embedding.
    """

    name = "sasrec"

    def __init__(
        self,
        dim: int = 64,
        n_blocks: int = 2,
        n_heads: int = 2,
        max_len: int = 50,
        epochs: int = 20,
        batch_size: int = 128,
        n_negatives: int = 256,
        lr: float = 1e-3,
        dropout: float = 0.2,
        seed: int = 0,
        device: str = "cpu",
        max_train_s: float | None = None,
        num_threads: int | None = None,
    ) -> None:
        self.dim, self.n_blocks, self.n_heads, self.max_len = dim, n_blocks, n_heads, max_len
        self.epochs, self.batch_size, self.n_negatives, self.lr = epochs, batch_size, n_negatives, lr
        self.dropout, self.seed, self.device, self.max_train_s = dropout, seed, device, max_train_s
        self.num_threads = num_threads  # torch intra-op threads while fitting/scoring (None = leave as is)

    def fit(self, train: pd.DataFrame, items: ItemSpace) -> None:
        with _torch_threads(self.num_threads):
            self._fit(train, items)

    def _fit(self, train: pd.DataFrame, items: ItemSpace) -> None:
        import torch

        t0 = time.perf_counter()
        pos = self._prepare(train, items)
        torch.manual_seed(self.seed)
        rng = np.random.default_rng(self.seed)
        windows = _sequence_windows(pos, self.max_len + 1)  # (W, max_len+1) int64, 0 = pad, item i -> i+1
        if len(windows) == 0:
            raise ValueError("sasrec: no user has 2 or more positive train events; nothing to learn from")
        self.net = _SASRecNet(
            items.n_items, self.dim, self.n_blocks, self.n_heads, self.max_len, self.dropout
        )
        self.net.to(self.device)
        opt = torch.optim.Adam(self.net.parameters(), lr=self.lr)
        known_tok = np.flatnonzero(self.known) + 1
        loss_val, epoch = float("nan"), 0
        for epoch in range(1, self.epochs + 1):
            self.net.train()
            order = rng.permutation(len(windows))
            total, n_tok = 0.0, 0
            for s in range(0, len(order), self.batch_size):
                w = torch.from_numpy(windows[order[s : s + self.batch_size]]).to(self.device)
                inp, tgt = w[:, :-1], w[:, 1:]  # (b, L)
                h = self.net(inp)  # (b, L, D)
                m = tgt > 0
                hs, ts = h[m], tgt[m]  # (T, D), (T,)
                negs = torch.from_numpy(rng.choice(known_tok, size=self.n_negatives)).to(self.device)
                emb = self.net.item_emb
                pos_logit = (hs * emb(ts)).sum(-1, keepdim=True)  # (T, 1)
                neg_logit = hs @ emb(negs).T  # (T, K)
                neg_logit = neg_logit.masked_fill(negs[None, :] == ts[:, None], float("-inf"))
                logits = torch.cat([pos_logit, neg_logit], dim=1)
                loss = torch.nn.functional.cross_entropy(
                    logits, torch.zeros(len(ts), dtype=torch.long, device=self.device)
                )
                opt.zero_grad()
                loss.backward()
                opt.step()
                total, n_tok = total + loss.item() * len(ts), n_tok + len(ts)
            loss_val = total / max(n_tok, 1)
            logger.info(
                "sasrec epoch %d/%d: loss %.4f (%.0fs)",
                epoch,
                self.epochs,
                loss_val,
                time.perf_counter() - t0,
            )
            if self.max_train_s is not None and time.perf_counter() - t0 > self.max_train_s:
                logger.info(
                    "sasrec: stopping after epoch %d, time budget %.0fs reached", epoch, self.max_train_s
                )
                break
        self.final_loss = loss_val
        logger.info(
            "sasrec: %d windows, %d epochs, final sampled-softmax loss %.3f (%.1fs)",
            len(windows),
            epoch,
            loss_val,
            time.perf_counter() - t0,
        )

    def score(self, histories: list[History]) -> np.ndarray:
        with _torch_threads(self.num_threads):
            return self._score(histories)

    def _score(self, histories: list[History]) -> np.ndarray:
        import torch

        seqs = np.zeros((len(histories), self.max_len), dtype=np.int64)  # left-padded, (B, L)
        for b, h in enumerate(histories):
            idx = self._history_items(h)[-self.max_len :] + 1
            if len(idx):
                seqs[b, -len(idx) :] = idx
        self.net.eval()
        with torch.no_grad():
            x = torch.from_numpy(seqs).to(self.device)
            h = self.net(x)[:, -1]  # (B, D)
            scores = (h @ self.net.item_emb.weight[1:].T).float().cpu().numpy()  # (B, N)
        empty = seqs[:, -1] == 0
        scores[empty] = 0.0  # no known history: no opinion (ties)
        return self._mask_cold(np.ascontiguousarray(scores, dtype=np.float32))


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


BASELINES = ("popularity", "itemknn", "als", "sasrec", "zeroshot_text")


def make_baseline(name: str, seed: int = 0, **kwargs: object) -> object:
    """A fresh baseline by its metrics.json name (one of `BASELINES`)."""
    table = {
        "popularity": lambda: PopularityRecommender(),
        "itemknn": lambda: ItemKNNRecommender(**kwargs),
        "als": lambda: ALSRecommender(seed=seed, **kwargs),
        "sasrec": lambda: SASRecRecommender(seed=seed, **kwargs),
        "zeroshot_text": lambda: ZeroShotTextRecommender(**kwargs),
    }
    if name not in table:
        raise ValueError(f"unknown baseline {name!r}; choose from {list(BASELINES)}")
    return table[name]()


# ----------------------------------------------------------------------------------------------- helpers


@contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    if n is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _sequence_windows(pos: pd.DataFrame, width: int) -> np.ndarray:
    """Cut each user's time-ordered item sequence into windows of `width` tokens (item i -> token i+1).

    The last window of a user ends at its last event; shorter windows are left-padded with 0.
    Users with a single event give no window. Returns int64 (W, width).
    """
    from llmrec.eval.split import sort_events

    df = sort_events(pos)
    out = []
    for _, g in df.groupby(USER_ID, sort=False):
        toks = g[ITEM_IDX].to_numpy() + 1
        if len(toks) < 2:
            continue
        for end in range(len(toks), 1, -(width - 1)):  # windows overlap by one item so every pair is trained
            w = toks[max(0, end - width) : end]
            row = np.zeros(width, dtype=np.int64)
            row[-len(w) :] = w
            out.append(row)
    return np.stack(out) if out else np.zeros((0, width), dtype=np.int64)


def _sasrec_net_cls():  # torch imported lazily
    import torch
    from torch import nn

    class SASRecNet(nn.Module):
        def __init__(self, n_items: int, dim: int, n_blocks: int, n_heads: int, max_len: int, dropout: float):
            super().__init__()
            self.item_emb = nn.Embedding(n_items + 1, dim, padding_idx=0)
            self.pos_emb = nn.Embedding(max_len, dim)
            # unit-norm item vectors: inputs (x sqrt(dim)) have unit per-dim scale and the output logits
            # h . e (h layer-normed) start near N(0, 1): the sampled softmax starts at chance, not far above
            nn.init.normal_(self.item_emb.weight, std=dim**-0.5)
            nn.init.normal_(self.pos_emb.weight, std=1.0)
            with torch.no_grad():
                self.item_emb.weight[0].zero_()
            layer = nn.TransformerEncoderLayer(
                dim, n_heads, dim_feedforward=dim, dropout=dropout, batch_first=True, norm_first=True
            )
            self.blocks = nn.TransformerEncoder(layer, n_blocks, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(dim)
            self.drop = nn.Dropout(dropout)
            self.scale = math.sqrt(dim)
            self.n_heads = n_heads

        def forward(self, seq: torch.Tensor) -> torch.Tensor:  # (B, L) tokens -> (B, L, D)
            b, length = seq.shape
            pos = torch.arange(length, device=seq.device)[None, :].expand(b, length)
            x = self.drop(self.item_emb(seq) * self.scale + self.pos_emb(pos))
            x = self.blocks(x, mask=self._attn_mask(seq))
            return self.norm(x)

        def _attn_mask(self, seq: torch.Tensor) -> torch.Tensor:
            # True = may not attend. Query i sees keys j <= i that are not padding; every query also sees
            # itself, so no row is fully masked (a fully masked row gives NaN that leaks through 0-weights).
            length = seq.shape[1]
            ar = torch.arange(length, device=seq.device)
            allowed = (ar[None, :] <= ar[:, None])[None] & (seq != 0)[:, None, :]  # (B, L, L)
            allowed = allowed | torch.eye(length, dtype=torch.bool, device=seq.device)[None]
            return (~allowed).repeat_interleave(self.n_heads, dim=0)  # (B * heads, L, L)

    return SASRecNet


def _SASRecNet(*args: object):  # noqa: N802
    return _sasrec_net_cls()(*args)
