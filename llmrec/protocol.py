"""The shared types of llmrec (the bottom layer: numpy only at run time, imports nothing of llmrec).

- `ItemSpace`, `History`: the catalog's index space and one user's history in it.
- `Recommender`: the interface every evaluated model implements (llmrec's scorer and each baseline alike).
- `UserEncoder`, `Ranker`, `Ranked`: what serving (`llmrec.serve.recommend_core.RecommendCore`) needs of a
  zero-shot user vectorizer (`llmrec.state.user_state.MeanVectorizer`) and of a trained ranker
  (`llmrec.scorer.inference.Scorer`).

Items live in one fixed index space for a whole evaluation: `ItemSpace.item_ids[i]` is item i, in the order of
the embeddings artifact (every catalog item, including items never seen in training = cold items).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:  # annotations only: importing the protocol costs numpy alone
    import pandas as pd
    import scipy.sparse as sp

__all__ = ["History", "ItemSpace", "Ranked", "Ranker", "Recommender", "UserEncoder"]


@dataclass(frozen=True)
class ItemSpace:
    item_ids: np.ndarray  # (N,) object/str, catalog order
    text_vectors: np.ndarray  # (N, D) float32, L2-normalised BERT text embeddings, row i = item_ids[i]
    titles: np.ndarray | None = None  # (N,) str, for reports; may be None
    # (N,) per item its facet names (schema.FACETS: genres, categories, ...), or None when the catalog has
    # none; the scorer synthesises text feedback about them in training
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
    # (T, D) float32 text-feedback vectors (the item encoder's), oldest first
    fb_vec: np.ndarray | None = None
    fb_pol: np.ndarray | None = None  # (T,) float32 polarity of each text, +1 or -1


class Recommender(Protocol):
    name: str  # key in metrics.json["models"]

    def fit(self, train: pd.DataFrame, items: ItemSpace) -> None:
        """train: interactions columns (user_id, item_id, ts, rating, event) plus `item_idx` int64."""

    def score(self, histories: list[History]) -> np.ndarray:
        """Scores over the whole catalog: float32 (B, N); higher is better. -inf = cannot recommend."""


@runtime_checkable  # isinstance checks the members' presence (tests/test_serve_core.py)
class UserEncoder(Protocol):
    """A user's state -> one vector in the item text space (the zero-shot user vector).

    `user` has `history` [(item_id, event, value, ts)], `negatives` {item_id: weight} and `text_feedback`
    [(text, polarity, vector (D,) | None)] (a `llmrec.state.user_state.UserState` or serve's `UserView`).
    """

    def __call__(self, user: Any) -> np.ndarray | None:
        """float32 (D,) L2-normalised, or None for a user without a positive signal."""


@dataclass
class Ranked:
    """What `Ranker.rank` returns for B users and n candidate slots each.

    cand: int64 (B, n) catalog indices; score: float32 (B, n) final ranking score, -inf where the slot is not
    a candidate (excluded, duplicate, or padding); parts: float32 (B, n) each, the additive split of `score`:
    "behaviour" (ID/sequence part of the user vector and the MLP head's correction), "content" (the history
    text arm), "feedback" (the user's text feedback), "cooc" (the co-occurrence term); user_vecs (B, r).
    """

    cand: np.ndarray
    score: np.ndarray
    parts: dict[str, np.ndarray]
    user_vecs: np.ndarray


@runtime_checkable
class Ranker(Protocol):
    """A trained user encoder + re-ranker over its own item space (`llmrec.scorer.inference.Scorer`)."""

    item_ids: np.ndarray  # (M,) str, row j of the ranker's space = item_ids[j]
    cooc: sp.csr_matrix | None  # (M, M) item co-occurrence similarity (llmrec.cooc), None when absent

    def rank(
        self,
        histories: Sequence[History],
        n_candidates: int = 200,
        exclude: Sequence[np.ndarray] | None = None,
        exclude_history: bool = True,
        extra: Sequence[np.ndarray] | None = None,
        use_cooc: bool = True,
    ) -> Ranked:
        """Rank B users' candidates (indices into `item_ids`): retrieval top-n_candidates plus `extra`, minus
        `exclude` (and the history when exclude_history); see `Ranked`."""
