"""The interface every evaluated model implements (llmrec's scorer and each baseline alike).

Items live in one fixed index space for a whole evaluation: `ItemSpace.item_ids[i]` is item i, in the order of
the embeddings artifact (every catalog item, including items never seen in training = cold items).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pandas as pd

from llmrec.data.order import sort_events
from llmrec.schema import EVENT, ITEM_IDX, RATING, TS, USER_ID


@dataclass(frozen=True)
class ItemSpace:
    item_ids: np.ndarray  # (N,) object/str, catalog order
    text_vectors: np.ndarray  # (N, D) float32, L2-normalised BERT text embeddings, row i = item_ids[i]
    titles: np.ndarray | None = None  # (N,) str, for reports; may be None
    # (N,) per item its facet names (schema.FACETS: genres, categories, ...), or None when the catalog has none;
    # the scorer synthesises text feedback about them in training
    facets: list[list[str]] | None = None
    # the text encoder (local folder or hub name) that made text_vectors: texts are encoded with it to land in
    # the same space (None = unknown, no text can be encoded)
    text_model: str | None = None

    @property
    def n_items(self) -> int:
        return len(self.item_ids)


@dataclass(frozen=True)
class History:
    """One user's time-ordered history as of the moment of recommendation, plus what the user said."""

    user_id: str
    item_idx: np.ndarray  # (L,) int64 indices into ItemSpace, oldest first
    ts: np.ndarray  # (L,) int64
    event: np.ndarray  # (L,) str, schema.EVENT_KINDS
    rating: np.ndarray  # (L,) float64, NaN where none
    fb_vec: np.ndarray | None = None  # (T, D) float32 text-feedback vectors (the item encoder's), oldest first
    fb_pol: np.ndarray | None = None  # (T,) float32 polarity of each text, +1 or -1


class Recommender(Protocol):
    name: str  # key in metrics.json["models"]

    def fit(self, train: pd.DataFrame, items: ItemSpace) -> None:
        """train: interactions columns (user_id, item_id, ts, rating, event) plus `item_idx` int64."""

    def score(self, histories: list[History]) -> np.ndarray:
        """Scores over the whole catalog: float32 (B, N); higher is better. -inf = cannot recommend."""


def make_histories(events: pd.DataFrame, user_ids: Sequence[str], seed: int = 0) -> list[History]:
    """One time-ordered `History` per requested user (empty when the user has no events), same order.

    events: interactions with `item_idx` (schema.ITEM_IDX); ordered by `llmrec.data.order.sort_events(events,
    seed)` (ts, then seeded random ties), the order of the splits.
    """
    df = sort_events(events, seed)
    u = df[USER_ID].to_numpy()
    starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]]) if len(u) else np.zeros(0, dtype=np.int64)
    ends = np.r_[starts[1:], len(u)]
    span = {u[s]: (s, e) for s, e in zip(starts, ends, strict=True)}
    idx = df[ITEM_IDX].to_numpy(np.int64)
    ts = df[TS].to_numpy(np.int64)
    ev = df[EVENT].to_numpy(dtype=object) if EVENT in df.columns else np.full(len(df), "view", dtype=object)
    rt = df[RATING].to_numpy(np.float64) if RATING in df.columns else np.full(len(df), np.nan)
    out = []
    for user in user_ids:
        s, e = span.get(user, (0, 0))
        out.append(History(user_id=str(user), item_idx=idx[s:e], ts=ts[s:e], event=ev[s:e], rating=rt[s:e]))
    return out
