"""Pure ranking logic behind `GET /recommend` and `llmrec replay` (numpy only; no Ray, no HTTP): the
`Catalog`, `RecommendCore` and its `RankConfig`, and loading them from a run folder. What it ranks for, a
user and an optional query, is `llmrec.serve.user_view` (`UserView`, `Query`).

Pipeline for one user (batched over B users at once, see `RecommendCore.recommend`):

1. user vector: with a `Scorer` deployed and a history or text feedback, the trained user encoder over the
   history and the user's text feedback (`Scorer.rank`, the ranking path shared with `llmrec recommend` and
   evaluation); otherwise the state's zero-shot vector (`MeanVectorizer`, computed by the state shard, or
   here by `vectorizer` when missing). New users (no vector): popularity prior.
2. query: a natural-language query's BERT vector `q` is blended with the text-space user vector,
   `normalize((1 - w) * u + w * q)` with `w = RankConfig.query_weight`; for new users `q` alone plus
   `pop_weight * popularity`.
3. candidates: the item index (text space) with that vector (scorer users: only with a query), plus, with a
   Scorer, its own retrieval candidates (`Scorer.rank`); seen items are dropped when `exclude_seen`.
4. re-rank: the Scorer's ranking score (`Scorer.rank`: MLP or u.v, text arm and text feedback included, plus
   its co-occurrence term; z-scored per user, plus `w` times the z-scored query cosine) when present, else
   the cosine itself.
5. push down: every candidate whose cosine (text space) to a negative item (dislike/skip) exceeds
   `neg_threshold` - the item itself included - loses `neg_penalty * weight`, so it sinks below the others.
6. reason: with the scorer, the signal that lifted the item most above the user's other candidates (its
   share of the z-scored score: the query, a positive text the user said, content similar to a liked item,
   co-occurrence with a liked item, or the behaviour part); without it, the query when it contributed more
   than the history, else the history item (by title) or the text feedback most similar to the pick, else
   "popular".

Choices the design leaves open (documented here): exclude_seen defaults to True at the API; penalised items
are pushed down, not removed; the positive history a reason names is `schema.is_positive` (like, purchase,
click, rating >= 4; not views), the one polarity table of the state, replay and training.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmrec.protocol import History, Ranker, UserEncoder
from llmrec.serve.user_view import Query, UserView

logger = logging.getLogger(__name__)

_VERBS = {"like": "liked", "purchase": "bought", "click": "clicked", "rating": "rated"}


@dataclass(frozen=True)
class RankConfig:
    query_weight: float = 0.5  # w in normalize((1-w) u + w q); 0 = ignore the query, 1 = query only
    pop_weight: float = 0.1  # weight of the popularity prior (log-count scaled to [0, 1]) for new users
    neg_threshold: float = 0.9  # cosine above which a candidate counts as a near-duplicate of a negative
    neg_penalty: float = 10.0  # subtracted (times the negative's weight) from a penalised candidate's score
    min_candidates: int = 100  # candidates retrieved per user: max(min_candidates, 4 k) + |seen|
    # unused since the scorer's user encoder reads text feedback itself (its gains are trained); accepted so
    # that existing user_config `rank` blocks keep loading
    text_feedback_weight: float = 0.3

    def __post_init__(self) -> None:
        if not 0.0 <= self.query_weight <= 1.0:
            raise ValueError(f"query_weight must be within [0, 1], got {self.query_weight}")
        if not -1.0 <= self.neg_threshold <= 1.0:
            raise ValueError(f"neg_threshold is a cosine within [-1, 1], got {self.neg_threshold}")
        if self.min_candidates < 1:
            raise ValueError(f"min_candidates must be >= 1, got {self.min_candidates}")


@dataclass
class Catalog:
    """The items a deployment can recommend, in embeddings order.

    item_ids: (N,) str; vectors: (N, D) float32 L2-normalised text vectors; titles: (N,) str;
    popularity: (N,) float >= 0 (interaction counts) or None.
    """

    item_ids: np.ndarray
    vectors: np.ndarray
    titles: np.ndarray
    popularity: np.ndarray | None = None
    id_to_idx: dict[str, int] = field(init=False, repr=False)
    pop_score: np.ndarray = field(init=False, repr=False)  # (N,) log-popularity scaled to [0, 1]

    def __post_init__(self) -> None:
        self.item_ids = np.asarray(self.item_ids, dtype=object)
        self.vectors = np.ascontiguousarray(self.vectors, dtype=np.float32)
        n = len(self.item_ids)
        if self.vectors.ndim != 2 or self.vectors.shape[0] != n:
            raise ValueError(f"vectors must be (N={n}, D), got {self.vectors.shape}")
        self.titles = np.asarray(self.titles if self.titles is not None else self.item_ids, dtype=object)
        if len(self.titles) != n:
            raise ValueError(f"titles must have N={n} entries, got {len(self.titles)}")
        self.id_to_idx = {str(i): j for j, i in enumerate(self.item_ids)}
        if len(self.id_to_idx) != n:
            raise ValueError("item_ids must be unique")
        pop = np.zeros(n, np.float64) if self.popularity is None else np.asarray(self.popularity, np.float64)
        if pop.shape != (n,):
            raise ValueError(f"popularity must be (N={n},), got {pop.shape}")
        lp = np.log1p(np.maximum(pop, 0.0))
        self.pop_score = (lp / lp.max() if lp.max() > 0 else lp).astype(np.float32)
        self._pop_order = np.argsort(-self.pop_score, kind="stable")

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])


class RecommendCore:
    """Ranks the catalog for a batch of users. Thread-compatible; swap a whole instance to change models.

    Args:
        catalog: the items (text vectors define the space of the index, the queries and the negatives).
        index: any object with `.search(queries (B, D) float32, k) -> (scores (B, k), item_ids (B, k))`
            (`llmrec.index.item_index.ItemIndex`); ids not in the catalog are ignored.
        scorer: optional `llmrec.protocol.Ranker` (`llmrec.scorer.inference.Scorer`: user encoder + MLP
            re-ranker).
        vectorizer: optional `llmrec.protocol.UserEncoder` (`(user) -> (D,) | None`, e.g.
            `llmrec.state.user_state.MeanVectorizer`), used when a state carries no vector.
        config: RankConfig.
    """

    def __init__(
        self,
        catalog: Catalog,
        index: Any,
        scorer: Ranker | None = None,
        vectorizer: UserEncoder | None = None,
        config: RankConfig | None = None,
    ) -> None:
        self.catalog = catalog
        self.index = index
        self.scorer = scorer
        self.vectorizer = vectorizer
        self.config = config or RankConfig()
        idx_dim = getattr(index, "dim", catalog.dim)
        if idx_dim != catalog.dim:
            raise ValueError(
                f"index dim {idx_dim} != catalog vector dim {catalog.dim}; "
                "rebuild the index from these embeddings"
            )
        if scorer is not None:
            s_ids = [str(i) for i in scorer.item_ids]
            self._s_id_to_idx = {i: j for j, i in enumerate(s_ids)}
            # scorer row j -> catalog row (or -1 when the scorer knows an item the catalog lacks)
            self._s_to_cat = np.array([catalog.id_to_idx.get(i, -1) for i in s_ids], dtype=np.int64)
            self._cat_to_s = np.full(catalog.n_items, -1, dtype=np.int64)
            ok = self._s_to_cat >= 0
            self._cat_to_s[self._s_to_cat[ok]] = np.nonzero(ok)[0]
            logger.info("scorer attached: %d scorer items, %d in the catalog", len(s_ids), int(ok.sum()))

    # ------------------------------------------------------------------ public
    def recommend(
        self,
        users: Sequence[UserView],
        k: int | Sequence[int] = 10,
        queries: Sequence[Query | None] | None = None,
        exclude_seen: bool | Sequence[bool] = True,
    ) -> list[list[dict[str, Any]]]:
        """Top-k per user: a list (B) of lists of {item_id, score, title, reason}, best first."""
        t0 = time.perf_counter()
        b = len(users)
        ks = [int(k)] * b if isinstance(k, (int, np.integer)) else [int(x) for x in k]
        qs = list(queries) if queries is not None else [None] * b
        ex = [bool(exclude_seen)] * b if isinstance(exclude_seen, bool) else [bool(x) for x in exclude_seen]
        if not (len(ks) == len(qs) == len(ex) == b):
            raise ValueError(f"k, queries and exclude_seen must have one entry per user ({b})")
        for q in qs:
            if q is not None and np.asarray(q.vector).shape != (self.catalog.dim,):
                raise ValueError(
                    f"query vector must be ({self.catalog.dim},), got {np.asarray(q.vector).shape}"
                )
        uvecs = [self._text_user_vector(u) for u in users]
        use_scorer = [self.scorer is not None and (self._has_history(u) or self._has_text(u)) for u in users]

        # text-space retrieval vectors (B, D); rows without any vector are retrieved by popularity
        w = self.config.query_weight
        rvecs, has_r = np.zeros((b, self.catalog.dim), np.float32), np.zeros(b, bool)
        for i, (u, q) in enumerate(zip(uvecs, qs, strict=True)):
            v = None
            if u is not None and q is not None:
                v = (1.0 - w) * u + w * q.vector
            elif q is not None:
                v = q.vector
            elif u is not None and not use_scorer[i]:
                v = u
            if v is not None and np.linalg.norm(v) > 0:
                rvecs[i], has_r[i] = v / np.linalg.norm(v), True
        n_cand = [
            min(self.catalog.n_items, max(self.config.min_candidates, 4 * kk) + (len(u.seen) if e else 0))
            for kk, u, e in zip(ks, users, ex, strict=True)
        ]
        cand: list[np.ndarray] = [np.zeros(0, np.int64)] * b
        if has_r.any():
            rows = np.nonzero(has_r)[0]
            _, ids = self.index.search(rvecs[rows], max(n_cand[i] for i in rows))
            for r, i in enumerate(rows):
                cand[i] = self._ids_to_idx(ids[r][: n_cand[i]])
        for i in range(b):
            if not has_r[i] and not use_scorer[i]:
                cand[i] = self.catalog._pop_order[: n_cand[i]]
        ranked = self._scorer_rank(users, use_scorer, cand, n_cand, ex)
        out = [
            self._rank_one(users[i], cand[i], ks[i], qs[i], ex[i], uvecs[i], ranked[i]) for i in range(b)
        ]
        logger.debug("ranked %d users in %.1f ms", b, (time.perf_counter() - t0) * 1e3)
        return out

    # ------------------------------------------------------------------ helpers
    def _has_history(self, u: UserView) -> bool:
        return any(item in self.catalog.id_to_idx for item, *_ in u.history)

    def _text_user_vector(self, u: UserView) -> np.ndarray | None:
        v = u.vector
        if v is None and self.vectorizer is not None and (u.history or u.text_feedback):
            v = self.vectorizer(u)
        if v is None:
            return None
        v = np.asarray(v, dtype=np.float32)
        if v.shape != (self.catalog.dim,):
            raise ValueError(
                f"user vector has shape {v.shape}, the catalog is {self.catalog.dim}-d; "
                "the state was built with "
                "another embedding model: DELETE the user or restart serving with the matching run"
            )
        n = float(np.linalg.norm(v))
        return v / n if n > 0 else None

    def _ids_to_idx(self, ids: Sequence[Any]) -> np.ndarray:
        get = self.catalog.id_to_idx.get
        idx = [get(str(i), -1) for i in ids if i is not None]
        return np.array([j for j in idx if j >= 0], dtype=np.int64)

    def _has_text(self, u: UserView) -> bool:
        return any(vec is not None and pol != 0 for _, pol, vec in u.text_feedback)

    def scorer_history(self, u: UserView) -> History:
        """The user as the scorer reads it: a `History` over scorer indices (items the scorer does not know
        are left out) with the user's text feedback (vector, polarity), oldest first."""
        ent = [
            (self._s_id_to_idx[it], ev, val, ts) for it, ev, val, ts in u.history if it in self._s_id_to_idx
        ]
        texts = [(vec, pol) for _, pol, vec in u.text_feedback
                 if vec is not None and pol != 0 and np.shape(vec) == (self.catalog.dim,)]
        return History(
            user_id=u.user_id,
            item_idx=np.array([e[0] for e in ent], np.int64),
            ts=np.array([int(e[3]) for e in ent], np.int64),
            event=np.array([e[1] for e in ent], dtype=object),
            rating=np.array([np.nan if e[2] is None else e[2] for e in ent], np.float64),
            fb_vec=np.stack([t[0] for t in texts]).astype(np.float32) if texts else None,
            fb_pol=np.array([t[1] for t in texts], np.float32) if texts else None,
        )

    def _scorer_rank(
        self,
        users: Sequence[UserView],
        mask: Sequence[bool],
        text_cand: Sequence[np.ndarray],
        n_cand: Sequence[int],
        exclude_seen: Sequence[bool],
    ) -> list[_ScorerRanking | None]:
        """`Scorer.rank` for the users in `mask` (one batch), mapped back to catalog rows; None elsewhere.

        The scorer ranks its retrieval candidates plus the text-index candidates (a query's neighbours) it
        knows; with exclude_seen, every seen item it knows is excluded. Catalog items the scorer does not
        know (added to the index after training) stay candidates below every scored one.
        """
        out: list[_ScorerRanking | None] = [None] * len(users)
        rows = [i for i, m in enumerate(mask) if m]
        if not rows:
            return out
        hists = [self.scorer_history(users[i]) for i in rows]
        to_s = self._cat_to_s
        extra = [to_s[text_cand[i]][to_s[text_cand[i]] >= 0] for i in rows]
        excl = [
            np.array(
                sorted({self._s_id_to_idx[s] for s in users[i].seen if s in self._s_id_to_idx}), np.int64
            )
            if exclude_seen[i] else np.zeros(0, np.int64)
            for i in rows
        ]
        r = self.scorer.rank(
            hists, n_candidates=max(n_cand[i] for i in rows), exclude=excl, exclude_history=False, extra=extra
        )
        from llmrec.scorer.data import positive_items

        for j, i in enumerate(rows):
            ok = np.isfinite(r.score[j]) & (self._s_to_cat[r.cand[j]] >= 0)
            cat_idx = self._s_to_cat[r.cand[j][ok]]
            unknown = text_cand[i][to_s[text_cand[i]] < 0]  # catalog items the scorer cannot score
            if exclude_seen[i] and len(unknown):
                seen_idx = {self.catalog.id_to_idx[s] for s in users[i].seen if s in self.catalog.id_to_idx}
                unknown = np.array([c for c in unknown if c not in seen_idx], np.int64)
            parts = {k: v[j][ok] for k, v in r.parts.items()}
            pad = {k: np.zeros(len(unknown), np.float32) for k in parts}
            out[i] = _ScorerRanking(
                cand=np.concatenate([cat_idx, unknown]).astype(np.int64),
                score=np.concatenate([r.score[j][ok], np.full(len(unknown), -np.inf, np.float32)]),
                parts={k: np.concatenate([parts[k], pad[k]]) for k in parts},
                positives=self._s_to_cat[positive_items(hists[j])],
            )
        return out

    def _rank_one(
        self,
        u: UserView,
        cand: np.ndarray,
        k: int,
        q: Query | None,
        exclude_seen: bool,
        uvec: np.ndarray | None,
        ranked: _ScorerRanking | None,
    ) -> list[dict[str, Any]]:
        cat, cfg = self.catalog, self.config
        if ranked is not None:  # the scorer ranked (and excluded) its own candidate list
            cand = ranked.cand
        elif exclude_seen and len(cand) and u.seen:
            seen_idx = {cat.id_to_idx[s] for s in u.seen if s in cat.id_to_idx}
            cand = np.array([c for c in cand if c not in seen_idx], dtype=np.int64)
        if len(cand) == 0:
            return []
        cv = cat.vectors[cand]  # (K, D)
        q_cos = cv @ q.vector if q is not None else None  # (K,)
        u_cos = cv @ uvec if uvec is not None else None  # (K,)
        w = cfg.query_weight
        # signal -> its share of the final score (scorer mode), for reasons
        contrib: dict[str, np.ndarray] = {}
        if ranked is not None:
            score, m, sd = _zscore_parts(ranked.score)
            contrib = {
                name: (1.0 - (w if q_cos is not None else 0.0)) * (x - _finite_mean(x, ranked.score)) / sd
                for name, x in ranked.parts.items()
            }
            if q_cos is not None:
                zq = _zscore(q_cos)
                score = (1.0 - w) * score + w * zq
                contrib["query"] = w * zq
        elif u_cos is not None and q_cos is not None:
            score = (1.0 - w) * u_cos + w * q_cos
        elif q_cos is not None:
            score = q_cos + cfg.pop_weight * cat.pop_score[cand]
        elif u_cos is not None:
            score = u_cos
        else:
            score = cat.pop_score[cand].astype(np.float32)
        score = np.nan_to_num(score.astype(np.float32), neginf=-1e6)

        # push down negatives and their near-duplicates
        pen = negative_penalty(cat, cv, u.negatives, cfg)  # (K,)
        score = score - cfg.neg_penalty * pen

        order = np.argsort(-score, kind="stable")[:k]
        pos = [(cat.id_to_idx[i], ev) for i, ev in u.positives() if i in cat.id_to_idx][:50]
        pos_v = cat.vectors[[j for j, _ in pos]] if pos else None  # (P, D)
        out = []
        for o in order:
            c = int(cand[o])
            if ranked is not None:
                reason = self._scorer_reason(u, c, q, {n: float(x[o]) for n, x in contrib.items()}, pos,
                                             pos_v, ranked.positives)
                reason += " (similar to something you disliked)" if pen[o] > 0 else ""
            else:
                reason = self._reason(u, c, q, w, q_cos, u_cos, o, pos, pos_v, bool(pen[o] > 0))
            out.append(
                {"item_id": str(cat.item_ids[c]), "score": float(score[o]), "title": str(cat.titles[c]),
                 "reason": reason}
            )
        return out

    def _scorer_reason(
        self,
        u: UserView,
        c: int,
        q: Query | None,
        contrib: dict[str, float],
        pos: list[tuple[int, str]],
        pos_v: np.ndarray | None,
        hist_cat: np.ndarray,
    ) -> str:
        """Name the signal that lifted catalog item c most above the user's other candidates."""
        cat = self.catalog
        for name in sorted(contrib, key=lambda n: -contrib[n]):
            if name == "query" and q is not None:
                return f"matches your query '{_clip(q.text)}'"
            if name == "feedback":
                best = None
                for text, pol, vec in u.text_feedback:
                    if pol > 0 and vec is not None and np.shape(vec) == (cat.dim,):
                        sim = float(np.asarray(vec) @ cat.vectors[c])
                        best = max(best or (sim, text), (sim, text))
                if best is not None:
                    return f"because you said '{_clip(best[1])}'"
                continue  # pushed up only because a negative text pushed others down: not a reason to name
            if name == "content" and pos_v is not None:
                j = int(np.argmax(pos_v @ cat.vectors[c]))
                return f"similar to '{cat.titles[pos[j][0]]}', which you {_VERBS.get(pos[j][1], 'liked')}"
            if name == "cooc" and self.scorer is not None and self.scorer.cooc is not None:
                s_c = self._cat_to_s[c]
                known = hist_cat[hist_cat >= 0]
                if s_c >= 0 and len(known):
                    s_hist = self._cat_to_s[known]
                    sims = np.asarray(self.scorer.cooc[s_hist][:, s_c].todense()).ravel()
                    if sims.max() > 0:
                        return f"people who liked '{cat.titles[known[int(np.argmax(sims))]]}' also liked this"
                continue
            if name == "behaviour" and pos:
                return (
                    f"fits your recent activity (you {_VERBS.get(pos[0][1], 'liked')} "
                    f"'{cat.titles[pos[0][0]]}')"
                )
        return "picked by your taste profile"

    def _reason(self, u, c, q, w, q_cos, u_cos, o, pos, pos_v, penalised) -> str:
        cat = self.catalog
        hist_part = None
        if pos_v is not None:
            sims = pos_v @ cat.vectors[c]
            j = int(np.argmax(sims))
            hist_part = (
                float(sims[j]),
                f"because you {_VERBS.get(pos[j][1], 'liked')} '{cat.titles[pos[j][0]]}'",
            )
        tf_part = None
        for text, pol, vec in u.text_feedback:
            if pol > 0 and vec is not None and vec.shape == (cat.dim,):
                s = float(vec @ cat.vectors[c])
                if tf_part is None or s > tf_part[0]:
                    tf_part = (s, f"because you said '{_clip(text)}'")
        if q is not None:
            u_contrib = (1.0 - w) * float(u_cos[o]) if u_cos is not None else -math.inf
            if hist_part is None or w * float(q_cos[o]) >= u_contrib:
                r = f"matches your query '{_clip(q.text)}'"
                return r + " (similar to something you disliked)" if penalised else r
        best = max([p for p in (hist_part, tf_part) if p is not None], default=None, key=lambda p: p[0])
        if best is not None:
            r = best[1]
        else:  # a vector from views / mid ratings only: no liked item to name, but not popularity either
            r = "based on your recent activity" if u_cos is not None else "popular with other users"
        return r + " (similar to something you disliked)" if penalised else r


def negative_penalty(catalog: Catalog, cand_vectors: np.ndarray, negatives: Mapping[str, float],
                     config: RankConfig) -> np.ndarray:
    """Push-down weight (K,) float32 of K candidates (cand_vectors (K, D)): the largest weight of a negative
    item (catalog id -> weight > 0) whose cosine to the candidate exceeds `config.neg_threshold`, else 0.
    The ranking subtracts `config.neg_penalty` times it (serving and the `served_text` evaluation model)."""
    neg = [(catalog.id_to_idx[i], w) for i, w in negatives.items() if i in catalog.id_to_idx and w > 0]
    if not neg:
        return np.zeros(len(cand_vectors), np.float32)
    nv = catalog.vectors[[j for j, _ in neg]]  # (M, D)
    nw = np.array([w for _, w in neg], np.float32)  # (M,)
    hit = cand_vectors @ nv.T > config.neg_threshold  # (K, M)
    return (hit * nw[None, :]).max(axis=1).astype(np.float32)  # (K,)


@dataclass
class _ScorerRanking:
    """One user's `Scorer.rank` output in catalog rows: cand (K,), score (K,) (-inf = unscored), parts
    {signal: (K,)}, positives (P,) catalog rows of the positive history (-1 = not in the catalog)."""

    cand: np.ndarray
    score: np.ndarray
    parts: dict[str, np.ndarray]
    positives: np.ndarray


def _finite_mean(x: np.ndarray, score: np.ndarray) -> float:
    fin = np.isfinite(score)
    return float(x[fin].mean()) if fin.any() else 0.0


def _zscore_parts(x: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(z-scored x as `_zscore`, mean, std used) so additive parts of x can be put on the same scale."""
    x = np.asarray(x, np.float32)
    fin = np.isfinite(x)
    if fin.sum() < 2:
        return np.where(fin, 0.0, -1e6).astype(np.float32), 0.0, 1.0
    m, s = float(x[fin].mean()), float(x[fin].std())
    s = s if s > 1e-9 else 1.0
    return np.where(fin, (x - m) / s, -1e6).astype(np.float32), m, s


def _zscore(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    fin = np.isfinite(x)
    if fin.sum() < 2:
        return np.where(fin, 0.0, -1e6).astype(np.float32)
    m, s = float(x[fin].mean()), float(x[fin].std())
    return np.where(fin, (x - m) / (s if s > 1e-9 else 1.0), -1e6).astype(np.float32)


def _clip(text: str, n: int = 60) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 3] + "..."


# ---------------------------------------------------------------------------- loading a run folder
def load_catalog(run_dir: str | Path) -> tuple[Catalog, dict[str, Any]]:
    """RUN/embeddings (+ RUN/data titles and interaction counts when present) -> (Catalog, embed meta)."""
    import pandas as pd

    from llmrec import schema
    from llmrec.embed.artifact import load_embeddings

    run = Path(run_dir)
    t0 = time.perf_counter()
    emb = load_embeddings(run / schema.RUN_EMBEDDINGS)
    ids = np.asarray(emb.item_ids, dtype=object)
    titles = ids.copy()
    items_path = run / schema.RUN_DATA / schema.ITEMS_FILE
    if items_path.is_file():
        items = pd.read_parquet(items_path)
        col = "title" if "title" in items.columns else schema.TEXT
        m = dict(zip(items[schema.ITEM_ID].astype(str), items[col].astype(str), strict=True))
        titles = np.array([m.get(str(i), str(i)) for i in ids], dtype=object)
    pop = None
    inter_path = run / schema.RUN_DATA / schema.INTERACTIONS_FILE
    if inter_path.is_file():
        counts = (
            pd.read_parquet(inter_path, columns=[schema.ITEM_ID])[schema.ITEM_ID].astype(str).value_counts()
        )
        pop = np.array([counts.get(str(i), 0) for i in ids], dtype=np.float64)
    cat = Catalog(item_ids=ids, vectors=emb.vectors, titles=titles, popularity=pop)
    logger.info("catalog: %d items, dim %d, loaded in %.2fs", cat.n_items, cat.dim, time.perf_counter() - t0)
    return cat, dict(emb.meta)


def default_scorer_is_better(run_dir: str | Path) -> tuple[bool, str]:
    """Serve RUN/scorer by default only where the run's own evaluation measured it above the text fallback.

    When no scorer is served, the app ranks with the state's text user vector (`MeanVectorizer`, which also
    reacts to free-text feedback); a scorer that ranks below it on the same split (RUN/eval/metrics.json,
    leave-last-out NDCG@10) would make recommendations worse. The fallback is evaluated as itself, the
    `served_text` model (llmrec.eval.served_text); an evaluation written before that model existed is read
    as before, against the `zeroshot_text` baseline, and the reason says so. Set `scorer_dir` in user_config
    to force either choice. Returns (use the scorer, the reason shown by GET /admin/model).
    """
    from llmrec import schema

    run = Path(run_dir)
    if not (run / schema.RUN_SCORER / schema.META_FILE).is_file():
        return False, "no trained scorer in the run"
    metrics_file = run / schema.RUN_EVAL / "metrics.json"
    if not metrics_file.is_file():
        return True, "no evaluation to compare against (run `llmrec evaluate`); using the trained scorer"
    models = json.loads(metrics_file.read_text()).get("loo", {}).get("models", {})
    ours = models.get("llmrec", {}).get("ndcg@10")
    text, name, note = models.get("served_text", {}).get("ndcg@10"), "served text fallback", ""
    if text is None:  # evaluated before served_text existed: the old, approximate comparison
        text, name = models.get("zeroshot_text", {}).get("ndcg@10"), "zero-shot text"
        note = (" (this evaluation has no served_text model, so the tuned zeroshot_text baseline stands "
                "in for the served fallback; re-run `llmrec evaluate` to compare with it)")
    if ours is None or text is None:
        return True, (
            "evaluation lacks llmrec or served_text/zeroshot_text under loo; using the trained scorer"
        )
    if ours > text:
        return True, f"loo ndcg@10 {ours:.4f} > {name} {text:.4f}{note}"
    return False, f"loo ndcg@10 {ours:.4f} <= {name} {text:.4f}; serving the text user vector instead{note}"
