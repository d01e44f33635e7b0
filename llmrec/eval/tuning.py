"""Every model tuned like llmrec: one validation split of the training events, a small stated grid per model,
the best setting by validation NDCG@10.

The validation (`InnerValidation`): under loo the split's own validation events (each user's second-to-last
event, up to `val_users` (1000) seeded users; the classic train / valid / test protocol); under time and cold
llmrec's own inner split, `llmrec.data.order.split_last_event(train, val_users, seed)` (the last train event
of up to `val_users` seeded users with >= 2 train events). llmrec chooses its epoch (early stopping),
re-ranker on/off, co-occurrence weight and text boost on it inside its own fit (`LLMRecRecommender(
validation=...)`); every baseline chooses its hyper-parameters on the very same targets. Only `split.train`
is ever handed to a fit (`Tuned.fit` refuses any other frame), so tuning never sees a test event (nor, under
loo, a validation event as training data).

- `Tuned(name, factory, grid, validation)`: fits each grid point on the inner train, scores the inner
  validation users (history = their inner-train events, history items excluded, repeat targets dropped, as
  in evaluation), keeps the best; grid models are then refit on the whole train split with that setting
  (`refit=True`; not under loo, whose inner train is the whole train split); early-stopping models (SASRec,
  `early_stopping = True`) keep their best-epoch fit on the inner train, as llmrec does.
- `Hybrid(name, candidates, knn)`: `z(candidate) + w * z(item-kNN)` (scores standardised per
  user over the finite entries), the candidate with the best validation NDCG@10 among `candidates` and `w`
  from `HYBRID_WEIGHTS` (0 included, so the hybrid is never worse on validation than its candidate) on the
  same validation; the fair counterpart of llmrec's co-occurrence term.

Budget: `GRIDS` (configs per fit): itemknn 12, als 12, bpr 8, ease 6, zeroshot_text 5, sasrec 1 (reference
settings, early stopping on validation, at most `epochs`), hybrids 8 weights each on top of their tuned
parts; llmrec: its own early stopping plus its co-occurrence grid and re-ranker switch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from llmrec.cooc import EASE_L2_GRID
from llmrec.data.histories import make_histories
from llmrec.data.order import sample_rows, split_last_event
from llmrec.metrics import RankingMetrics
from llmrec.protocol import History, ItemSpace, Recommender
from llmrec.schema import ITEM_IDX, USER_ID

logger = logging.getLogger(__name__)

__all__ = ["GRIDS", "HYBRID_WEIGHTS", "Hybrid", "InnerValidation", "Tuned", "combine_scores"]

# zero-shot text's recency half-lives (events) tried on validation; 1e9: the plain mean
TEXT_HALF_LIVES = (1.0, 3.0, 10.0, 30.0, 1e9)
GRIDS: dict[str, list[dict[str, Any]]] = {
    "popularity": [{}],
    "itemknn": [{"n_neighbors": k, "shrink": s} for k in (20, 50, 100, 200) for s in (0.0, 10.0, 100.0)],
    "als": [
        {"factors": f, "regularization": r, "alpha": a}
        for f in (64, 128)
        for r in (0.01, 0.1)
        for a in (1.0, 10.0, 40.0)
    ],
    "bpr": [
        {"factors": f, "learning_rate": lr, "regularization": r}
        for f in (64, 128)
        for lr in (0.01, 0.05)
        for r in (0.001, 0.01)
    ],
    "ease": [{"l2": lam} for lam in EASE_L2_GRID],  # the grid of the scorer's EASE term (llmrec.cooc)
    "sasrec": [{}],  # reference settings (SASRecRecommender defaults); early stopping picks the epoch
    "zeroshot_text": [{"half_life": h} for h in TEXT_HALF_LIVES],
    "zeroshot_text_new": [{"half_life": h} for h in TEXT_HALF_LIVES],
    "served_text": [{}],  # never tuned: it measures what serving runs, with serving's settings
}
HYBRID_WEIGHTS = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 10.0)


@dataclass
class InnerValidation:
    """The inner validation split of one training split (see the module docstring)."""

    source: pd.DataFrame  # the train frame it was built from (fits must be handed this very frame)
    train: pd.DataFrame  # inner train: what grid points are fit on (loo: the whole train split)
    valid: pd.DataFrame  # the validation events (one per validation user)
    histories: list[History]  # V validation users' inner-train histories
    targets: list[np.ndarray]  # V arrays (one item each): the held-out item index
    exclude: list[np.ndarray]  # V arrays: the user's history items (not rankable)
    n_items: int
    stats: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        train: pd.DataFrame,
        n_items: int,
        val_users: int | None,
        seed: int,
        valid: pd.DataFrame | None = None,
    ) -> InnerValidation:
        """The validation of a training split.

        Args:
            train: the split's train frame (the one every fit will be handed).
            n_items: catalog size N.
            val_users: at most this many validation users (llmrec's `val_users`; None = all).
            seed: seeds the user sample (and the tie order of the inner split).
            valid: the split's own validation events (loo: each user's second-to-last event); a seeded sample
                of `val_users` of them is used and the inner train is the whole `train`. None: hold out the
                last train event of up to `val_users` users (`split_last_event`, llmrec's own inner split).
        """
        if valid is not None:
            tr, va = train, sample_rows(valid, val_users, seed)
        else:
            tr, va = split_last_event(train, val_users, seed)
        users = va[USER_ID].to_numpy(dtype=object)
        hist = make_histories(tr, users, seed)
        targets, exclude, keep = [], [], []
        for i, (h, t) in enumerate(zip(hist, va[ITEM_IDX].to_numpy(np.int64), strict=True)):
            ex = np.unique(h.item_idx)
            if len(h.item_idx) == 0 or t in ex:  # no history, or a repeat nobody may rank (as in evaluation)
                continue
            keep.append(i)
            targets.append(np.array([t], dtype=np.int64))
            exclude.append(ex)
        stats = {
            "source": "split valid" if valid is not None else "inner split of train",
            "n_inner_train": len(tr),
            "n_valid_events": len(va),
            "n_valid_users": len(keep),
            "val_users": val_users,
            "seed": seed,
        }
        if not keep:
            raise ValueError(
                f"inner validation has no usable user ({len(va)} held-out events, all repeats or without "
                f"history); the training split is too small to tune on"
            )
        logger.info(
            "inner validation: %d users (of %d held out), %d inner-train events", len(keep), len(va), len(tr)
        )
        return cls(train, tr, va, [hist[i] for i in keep], targets, exclude, n_items, stats)

    def scores(self, model: Recommender, batch: int = 512) -> np.ndarray:
        """float32 (V, N): the model's scores of the validation users."""
        out = np.empty((len(self.histories), self.n_items), np.float32)
        for s in range(0, len(self.histories), batch):
            out[s : s + batch] = model.score(self.histories[s : s + batch])
        return out

    def ndcg(self, scores: np.ndarray) -> float:
        """Validation NDCG@10 of (V, N) scores (history items excluded, ties against the target)."""
        acc = RankingMetrics(self.n_items)
        acc.update(scores, self.targets, self.exclude)
        return float(acc.result()["ndcg@10"])


class Tuned:
    """A model whose hyper-parameters are chosen on an `InnerValidation` (see the module docstring).

    Args:
        name: the metrics.json key (the underlying model's name).
        factory: `factory(**params) -> Recommender`, called once per grid point (and once more to refit).
        grid: the settings tried (a list of keyword dicts; [{}] = the model's defaults only).
        validation: the inner split of the train frame `fit` will get.
        refit: refit the best setting on the whole train (grid models); False keeps the inner-train fit
            (early-stopping models, like llmrec).
    """

    def __init__(
        self,
        name: str,
        factory: Callable[..., Recommender],
        grid: Sequence[dict[str, Any]],
        validation: InnerValidation,
        refit: bool = True,
    ) -> None:
        if not grid:
            raise ValueError(f"{name}: empty tuning grid; pass at least one setting ([{{}}] = defaults)")
        self.name, self.factory, self.grid = name, factory, [dict(g) for g in grid]
        self.validation, self.refit = validation, refit
        self.model: Recommender | None = None
        self.val_scores: np.ndarray | None = None  # (V, N) of the chosen setting, for hybrids
        self.val_ndcg = float("nan")
        self.tuning: dict[str, Any] = {}

    def fit(self, train: pd.DataFrame, items: ItemSpace) -> None:
        val = self.validation
        if train is not val.source:
            raise ValueError(
                f"{self.name}: fit got a train frame other than the one its inner validation was built from; "
                f"build InnerValidation from the frame you fit on (tuning must only see training events)"
            )
        trials, best = [], None
        cache: dict[str, Any] = {}  # lent to models that share work across a grid (item-kNN's co-counts)
        for params in self.grid:
            t0 = time.perf_counter()
            model = self.factory(**params)
            if getattr(model, "shares_fit_cache", False):
                model.fit_cache = cache  # type: ignore[attr-defined]
            if getattr(model, "early_stopping", False):
                model.fit(val.train, items, validation=val)  # type: ignore[call-arg]
            else:
                model.fit(val.train, items)
            s = val.scores(model)
            ndcg = val.ndcg(s)
            trial = {
                "params": params,
                "val_ndcg@10": round(ndcg, 6),
                "fit_s": round(time.perf_counter() - t0, 2),
            }
            trial.update(getattr(model, "tuning", {}) or {})  # e.g. SASRec's best epoch
            trials.append(trial)
            logger.info(
                "%s: tuning %d/%d %s -> val ndcg@10 %.4f (%.1fs)",
                self.name,
                len(trials),
                len(self.grid),
                params or "defaults",
                ndcg,
                trial["fit_s"],
            )
            if best is None or ndcg > best[0]:
                best = (ndcg, params, model, s)
                best_trial = trial
            del model, s
        assert best is not None
        self.val_ndcg, params, model, self.val_scores = best
        if hasattr(model, "fit_cache"):
            del model.fit_cache  # the grid's shared work is not needed past tuning
        refit = self.refit and val.train is not val.source  # a split's own validation: fit once on train
        if refit:
            del model
            model = self.factory(**params)
            model.fit(train, items)
        self.model = model
        extra = {k: v for k, v in best_trial.items() if k not in ("params", "val_ndcg@10", "fit_s")}
        self.tuning = {
            "n_configs": len(self.grid),
            "best": params,
            "val_ndcg@10": round(self.val_ndcg, 6),
            "refit_on_train": refit,
            **extra,
            "trials": trials,
        }

    def score(self, histories: list[History]) -> np.ndarray:
        if self.model is None:
            raise RuntimeError(f"{self.name}: call fit(train, items) before score(histories)")
        return self.model.score(histories)


class Hybrid:
    """`z(best candidate) + w * z(item-kNN)`, the candidate and `w` chosen on the shared inner validation.

    candidates and knn are `Tuned` models, fitted before this one (list them earlier in the evaluation) unless
    they are in `owned` (parts nobody else evaluates: the hybrid fits them itself); their validation scores
    are reused, so choosing the candidate and the weight costs no fit.
    """

    def __init__(
        self,
        name: str,
        candidates: Sequence[Tuned],
        knn: Tuned,
        weights: Sequence[float] = HYBRID_WEIGHTS,
        owned: Sequence[Tuned] = (),
    ) -> None:
        if not candidates:
            raise ValueError(f"{name}: no candidate model to combine with item-kNN")
        self.name, self.candidates, self.knn, self.weights = name, list(candidates), knn, tuple(weights)
        self.owned = list(owned)
        self.base: Tuned | None = None
        self.weight = 0.0
        self.tuning: dict[str, Any] = {}

    def fit(self, train: pd.DataFrame, items: ItemSpace) -> None:
        for p in self.owned:
            p.fit(train, items)
        parts = [*self.candidates, self.knn]
        unfitted = [p.name for p in parts if p.model is None or p.val_scores is None]
        if unfitted:
            raise RuntimeError(f"{self.name}: fit {unfitted} first (the hybrid combines their fitted models)")
        if any(p.validation is not self.knn.validation for p in parts):
            raise ValueError(f"{self.name}: its parts were tuned on different validation splits")
        self.base = max(self.candidates, key=lambda m: m.val_ndcg)
        val = self.knn.validation
        by_w = {
            w: val.ndcg(combine_scores(self.base.val_scores, self.knn.val_scores, w)) for w in self.weights
        }
        self.weight = max(self.weights, key=lambda w: (by_w[w], -w))  # ties: the smaller weight
        self.tuning = {
            "base": self.base.name,
            "weight": self.weight,
            "val_ndcg@10": round(by_w[self.weight], 6),
            "n_configs": len(self.weights),
            "val_ndcg_by_weight": {f"{w:g}": round(v, 6) for w, v in by_w.items()},
            "candidates_val_ndcg@10": {m.name: round(m.val_ndcg, 6) for m in self.candidates},
        }
        logger.info(
            "%s: %s + %g x itemknn (val ndcg@10 %.4f; %s alone %.4f)",
            self.name,
            self.base.name,
            self.weight,
            by_w[self.weight],
            self.base.name,
            by_w[0.0] if 0.0 in by_w else float("nan"),
        )

    def score(self, histories: list[History]) -> np.ndarray:
        if self.base is None:
            raise RuntimeError(f"{self.name}: call fit(train, items) before score(histories)")
        return combine_scores(self.base.score(histories), self.knn.score(histories), self.weight)


def combine_scores(a: np.ndarray, b: np.ndarray, weight: float) -> np.ndarray:
    """float32 (B, N): z(a) + weight * z(b), each row standardised over its finite entries.

    A -inf (the model cannot score the item, e.g. an ID model's cold item) counts as that row's lowest finite
    score in the sum ("no evidence"); an item -inf in both stays -inf. weight 0 returns z(a) (the order of a).
    """
    za, fa = _row_z(a)
    if weight == 0.0:
        return za
    zb, fb = _row_z(b)
    out = _fill_low(za, fa) + np.float32(weight) * _fill_low(zb, fb)
    out[~(fa | fb)] = -np.inf
    return out.astype(np.float32)


def _fill_low(z: np.ndarray, fin: np.ndarray) -> np.ndarray:
    """z with its non-finite entries set to the row's lowest finite value (0 when the row has none)."""
    lo = np.where(fin, z, np.inf).min(1, keepdims=True)
    return np.where(fin, z, np.where(np.isfinite(lo), lo, 0.0))


def _row_z(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(z (B, N) with -inf kept where x is not finite, finite mask (B, N))."""
    x = np.asarray(x, dtype=np.float64)
    fin = np.isfinite(x)
    n = np.maximum(fin.sum(1, keepdims=True), 1)
    xf = np.where(fin, x, 0.0)
    mean = xf.sum(1, keepdims=True) / n
    sd = np.sqrt((np.where(fin, x - mean, 0.0) ** 2).sum(1, keepdims=True) / n)
    z = np.where(fin, (xf - mean) / np.where(sd > 0, sd, 1.0), -np.inf)
    return z.astype(np.float32), fin
