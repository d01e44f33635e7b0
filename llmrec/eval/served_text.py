"""`served_text`: the model `llmrec serve` ranks with when no scorer is served, as an evaluation model.

The serve-or-not rule (`recommend_core.default_scorer_is_better`) compares the trained scorer with this model,
so it must be the serving fallback itself, not the tuned `zeroshot_text` baseline (another half-life, other
negative weighting). Every part comes from serving's own code and defaults:

- user vector: `MeanVectorizer` over `state_from_history(history)` (the state a shard builds for a user the
  run knows: last `HISTORY_LEN` events, negatives, text feedback), with the parameters of the serving
  vectorizer factory (`llmrec.state.store.EmbeddingsMeanVectorizer` defaults);
- score: the cosine to every item, minus `neg_penalty` times `recommend_core.negative_penalty` (the push-down
  of negatives and their near-duplicates, `RankConfig` defaults);
- a user without a vector (no positive signal): serving's popularity prior (`Catalog.pop_score`, from the
  training interactions' counts).

Serving ranks only its `RankConfig.min_candidates` (>= 100) nearest items; the top-k of that list equals the
top-k over the whole catalog unless more than min_candidates - k candidates are pushed down, so scoring every
item (what evaluation needs) gives the served order. A `rank` block in the serving user_config is not seen
here (RankConfig defaults).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from llmrec.protocol import History, ItemSpace
from llmrec.schema import ITEM_IDX
from llmrec.serve.recommend_core import Catalog, RankConfig, negative_penalty
from llmrec.state.store import EmbeddingsMeanVectorizer
from llmrec.state.user_state import MeanVectorizer, state_from_history

HISTORY_LEN = 200  # events a state shard keeps per user (the `history_len` default of `llmrec serve`)


class ServedTextRecommender:
    """The serving fallback (module docstring) behind the evaluation `Recommender` protocol."""

    name = "served_text"

    def __init__(self, rank: RankConfig | None = None) -> None:
        self.rank = rank or RankConfig()

    def fit(self, train: pd.DataFrame, items: ItemSpace) -> None:
        vecs = np.asarray(items.text_vectors, dtype=np.float32)
        if vecs.ndim != 2 or len(vecs) != items.n_items:
            raise ValueError(f"served_text: text_vectors must be (N={items.n_items}, D), got {vecs.shape}")
        counts = np.bincount(train[ITEM_IDX].to_numpy(np.int64), minlength=items.n_items).astype(np.float64)
        ids = np.array([str(j) for j in range(items.n_items)], dtype=object)  # catalog id = row of the space
        self.catalog = Catalog(item_ids=ids, vectors=vecs, titles=ids, popularity=counts)
        factory = EmbeddingsMeanVectorizer("")  # only its parameters: the serving shards' vectorizer settings
        self.vectorizer = MeanVectorizer(ids, self.catalog.vectors, half_life=factory.half_life,
                                         negative_weight=factory.negative_weight,
                                         text_weight=factory.text_weight)

    def score(self, histories: list[History]) -> np.ndarray:
        """float32 (B, N): the served ranking score of every item."""
        cat, cfg = self.catalog, self.rank
        out = np.empty((len(histories), cat.n_items), np.float32)
        for b, h in enumerate(histories):
            rating = np.asarray(h.rating, np.float64)
            hist = [(str(int(i)), str(e), None if np.isnan(r) else float(r), float(t))
                    for i, e, r, t in zip(h.item_idx, h.event, rating, h.ts, strict=True)]
            st = state_from_history(str(h.user_id), hist, history_len=HISTORY_LEN)
            if h.fb_vec is not None and h.fb_pol is not None:
                st.text_feedback = [("", float(p), np.asarray(v, np.float32))
                                    for v, p in zip(h.fb_vec, h.fb_pol, strict=True)]
            u = self.vectorizer(st)
            if u is None:
                out[b] = cat.pop_score
                continue
            s = cat.vectors @ np.asarray(u, np.float32)  # (N,)
            out[b] = s - cfg.neg_penalty * negative_penalty(cat, cat.vectors, st.negatives, cfg)
        return out
