"""llmrec's scorer behind the evaluation protocol (`llmrec.eval.protocol.Recommender`).

`fit` trains with Ray Train (`fit_scorer`), which holds out the last train event of up to `val_users` (default
1000) seeded-hash-chosen train users with >= 2 events as the validation target for early stopping and the
post-training choices (the same path as `llmrec train`); every other event is trained on. `score` returns full-catalog scores in which the retrieval top-`n_candidates` (history items
excluded) carry their MLP re-rank score and sit above every other item, so full-ranking metrics measure the
production two-stage pipeline.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from llmrec.eval.protocol import History, ItemSpace
from llmrec.schema import TS, USER_ID

logger = logging.getLogger(__name__)


def split_last_event(
    df: pd.DataFrame, max_users: int | None = None, seed: int = 0
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, valid): each user's last event by ts (ties: the last in input order) goes to valid when the
    user has >= 2 events; everything else stays in train.

    max_users: hold out the last event of at most this many users (a seeded random sample of the eligible
    ones; None = all). Every held-out event is a training pair lost: on Magazine's leave-last-out train split
    (76,240 events, most users with 1-3), holding out all 8,535 eligible users left 1,910 training pairs, 1,000
    users left 9,445.
    """
    if max_users is not None and max_users < 0:
        raise ValueError(f"max_users must be >= 0 or None, got {max_users}")
    d = df.sort_values([USER_ID, TS], kind="stable")
    n_per_user = d.groupby(USER_ID, sort=False)[TS].transform("size").to_numpy()
    is_last = ~d[USER_ID].duplicated(keep="last").to_numpy()
    to_valid = is_last & (n_per_user >= 2)
    if max_users is not None and to_valid.sum() > max_users:
        rows = np.flatnonzero(to_valid)
        keep = np.random.default_rng(seed).choice(len(rows), size=max_users, replace=False)
        to_valid = np.zeros(len(d), bool)
        to_valid[rows[keep]] = True
    return d[~to_valid].reset_index(drop=True), d[to_valid].reset_index(drop=True)


class LLMRecRecommender:
    """Recommender protocol adapter: Ray Train fit + two-stage full-catalog scores.

    Args:
        name: key in metrics.json["models"].
        out_dir: where the scorer artifact goes (default: a temporary folder kept for this object's life).
        n_candidates: retrieval candidates re-ranked by the MLP in `score`.
        train_kwargs: passed to `fit_scorer` (num_workers, epochs, batch_size, lr, seed, patience, dim, ...).
    """

    def __init__(
        self,
        name: str = "llmrec",
        out_dir: str | os.PathLike | None = None,
        n_candidates: int = 200,
        **train_kwargs: Any,
    ):
        self.name = name
        self.out_dir = out_dir
        self.n_candidates = n_candidates
        self.train_kwargs = train_kwargs
        self.scorer = None
        self.meta: dict | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None

    def fit(self, train: pd.DataFrame, items: ItemSpace) -> None:
        from llmrec.scorer.inference import Scorer
        from llmrec.scorer.train import fit_scorer

        if self.out_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="llmrec-scorer-")
            out = Path(self._tmp.name)
        else:
            out = Path(self.out_dir)
        logger.info("%s: fit on %d events (validation users held out inside fit_scorer)", self.name, len(train))
        self.meta = fit_scorer(train, items, out, **self.train_kwargs)
        self.scorer = Scorer.load(out)

    def score(self, histories: list[History], use_cooc: bool = True) -> np.ndarray:
        if self.scorer is None:
            raise RuntimeError(f"{self.name}: call fit(train, items) before score(histories)")
        out = np.empty((len(histories), self.scorer.n_items), np.float32)
        for s in range(0, len(histories), 256):
            out[s : s + 256] = self.scorer.full_scores(
                histories[s : s + 256], n_candidates=self.n_candidates, use_cooc=use_cooc
            )
        return out

    def neural_only(self) -> NeuralOnlyView:
        """The same fitted scorer ranked without its co-occurrence term, as a model of its own."""
        return NeuralOnlyView(self)


class NeuralOnlyView:
    """`<name>_neural`: an LLMRecRecommender's scorer without the co-occurrence term (text + ID towers, and the
    MLP head when on). It shares the parent's fit, so list it after the parent; its own `fit` only checks
    that the parent was fitted on the same call sequence."""

    def __init__(self, parent: LLMRecRecommender):
        self.parent = parent
        self.name = f"{parent.name}_neural"

    def fit(self, train: pd.DataFrame, items: ItemSpace) -> None:
        if self.parent.scorer is None:
            raise RuntimeError(f"{self.name}: fit {self.parent.name} first (this view shares its scorer)")

    def score(self, histories: list[History]) -> np.ndarray:
        return self.parent.score(histories, use_cooc=False)
