"""llmrec's scorer behind the evaluation protocol (`llmrec.protocol.Recommender`).

`fit` trains with Ray Train (`fit_scorer`) holding out the last train event (`llmrec.data.order`: by ts,
seeded random ties) of up to `val_users` (default 1000) random train users with >= 2 events as the validation
target for early stopping and best-checkpoint choice; every other event is trained on. `score` returns
full-catalog scores in which the retrieval top-`n_candidates` (history items excluded) carry their MLP re-rank
score and sit above every other item, so full-ranking metrics measure the production two-stage pipeline.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from llmrec.artifacts import load_torch_file
from llmrec.config import HELD_OUT_KINDS, TrainConfig, config_from_dict
from llmrec.data.order import frame_fingerprint, split_last_event
from llmrec.protocol import History, ItemSpace
from llmrec.schema import INDEX_IDS_FILE, META_FILE, SCORER_MODEL_FILE

logger = logging.getLogger(__name__)

# (train frame, item space) -> ({COLD_CHOICES field: value}, summary): `llmrec.eval.cold_choice`
ColdChooser = Callable[[pd.DataFrame, ItemSpace], tuple[dict[str, Any], dict[str, Any]]]


class LLMRecRecommender:
    """Recommender protocol adapter: Ray Train fit + two-stage full-catalog scores.

    Args:
        name: key in metrics.json["models"].
        out_dir: where the scorer artifact goes (default: a temporary folder kept for this object's life).
        n_candidates: retrieval candidates re-ranked by the MLP in `score`.
        validation: the evaluation's shared validation split (`llmrec.eval.tuning.InnerValidation`) of the
            train frame `fit` gets: training then uses its inner train and validation events, the very targets
            the baselines are tuned on (None: `split_last_event(train, val_users, seed)`, the same split for
            an inner-split validation).
        pretrained: `fit` loads the scorer already in `out_dir` instead of training, after checking that it
            was trained on this very train frame, validation and item vectors (`reusable_scorer`).
        cold_chooser: makes the cold-item choices (`llmrec.scorer.finalize.COLD_CHOICES`) in place of the
            made-cold validation's: called as `cold_chooser(train, items)` before the fit, it returns
            ({field: value}, summary), handed to `fit_scorer(cold_pick=)` (`llmrec.eval.cold_choice.
            held_out_cold_choice`, which `llmrec.eval.models` passes under the cold protocol and for a run
            whose scorer was trained with a held-out `cold_choice`). Given exactly when train_kwargs'
            `cold_choice` (`TrainConfig.cold_choice`) is a held-out kind: the kind it makes.
        train_kwargs: fields of `llmrec.config.TrainConfig` (num_workers, epochs, batch_size, lr, seed, dim,
            ...); the others keep its defaults. An unknown name raises here, not at `fit`.
    """

    def __init__(
        self,
        name: str = "llmrec",
        out_dir: str | os.PathLike | None = None,
        n_candidates: int = 200,
        validation: Any = None,
        pretrained: bool = False,
        cold_chooser: ColdChooser | None = None,
        **train_kwargs: Any,
    ):
        if pretrained and out_dir is None:
            raise ValueError("pretrained=True needs out_dir, the trained scorer folder")
        self.name = name
        self.out_dir = out_dir
        self.n_candidates = n_candidates
        self.validation = validation
        self.pretrained = pretrained
        self.cold_chooser = cold_chooser
        self.train_kwargs = train_kwargs
        self.train_config = config_from_dict(TrainConfig, train_kwargs, f"{name} (LLMRecRecommender)")
        held_out = self.train_config.cold_choice in HELD_OUT_KINDS
        if (cold_chooser is not None) != held_out:
            raise ValueError(
                f"{name}: a cold_chooser goes with a held-out cold_choice ({', '.join(HELD_OUT_KINDS)}: the "
                f"kind it makes), got cold_choice={self.train_config.cold_choice!r} and "
                f"{'a' if cold_chooser else 'no'} cold_chooser (llmrec.eval.models passes both)")
        self.scorer = None
        self.meta: dict | None = None
        self.tuning: dict[str, Any] = {}
        self._tmp: tempfile.TemporaryDirectory | None = None

    def fit(self, train: pd.DataFrame, items: ItemSpace) -> None:
        from llmrec.scorer.inference import Scorer
        from llmrec.scorer.train import fit_scorer

        if self.out_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="llmrec-scorer-")
            out = Path(self._tmp.name)
        else:
            out = Path(self.out_dir)
        if self.validation is not None:
            if train is not self.validation.source:
                raise ValueError(f"{self.name}: fit got a train frame other than its validation's source")
            tr, va = self.validation.train, self.validation.valid
        else:
            tr, va = split_last_event(train, self.train_config.val_users, self.train_config.seed)
        choice: tuple[dict[str, Any], dict[str, Any]] | None = None
        if self.pretrained:
            ok, why = reusable_scorer(out, tr, va, items)
            if not ok:
                raise ValueError(f"{self.name}: the scorer in {out} cannot stand for this fit: {why}")
            self.meta = json.loads((out / META_FILE).read_text())
            logger.info("%s: reusing the scorer in %s (trained on this very split)", self.name, out)
            made = (self.meta.get("config") or {}).get("cold_choice", "made-cold")
            if self.cold_chooser is not None and made != self.train_config.cold_choice:  # made otherwise
                choice = self.cold_chooser(train, items)
        else:
            if self.cold_chooser is not None:  # an inner training of its own, independent of this fit
                choice = self.cold_chooser(train, items)
            logger.info("%s: fit on %d events, %d validation targets", self.name, len(tr), len(va))
            self.meta = fit_scorer(self.train_config, tr, items, out, valid_df=va if len(va) else None,
                                   cold_pick=choice)
        self.scorer = Scorer.load(out)
        m = self.meta or {}
        cfg = m.get("model_config", {}) or {}
        self.tuning = {"best_epoch": m.get("best_epoch"), "rerank": cfg.get("rerank"),
                       "cooc_weight": cfg.get("cooc_weight"), "n_valid": len(va),
                       "reused_run_scorer": self.pretrained,
                       "val_ndcg@10": (m.get("metrics") or {}).get("val_ndcg@10")}
        from llmrec.scorer.finalize import COLD_CHOICES

        if choice is not None and self.pretrained:
            self.scorer.choose(**choice[0])
            logger.info("%s: cold-item choice %s in place of the reused scorer's", self.name, choice[0])
        if choice is not None:
            self.tuning["cold_choice"] = {"pick": choice[0], **choice[1]}
        elif self.cold_chooser is not None:  # the reused scorer's own held-out choice, made on this split
            self.tuning["cold_choice"] = {"pick": {k: cfg.get(k) for k in COLD_CHOICES},
                                          **(m.get("cold_bonus") or {})}
        # what the scorer ranks with (the made-cold validation's choice, or the held-out one)
        self.tuning["cold_served"] = {k: getattr(self.scorer.model.cfg, k) for k in COLD_CHOICES}
        method = (m.get("cold_bonus") or {}).get("method", "made-cold")
        self.tuning["cold_method"] = self.train_config.cold_choice if choice is not None else method

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


def reusable_scorer(
    scorer_dir: str | os.PathLike, train: pd.DataFrame, valid: pd.DataFrame, items: ItemSpace
) -> tuple[bool, str]:
    """(True, "") when `scorer_dir` holds a scorer trained on exactly these train and validation events
    (meta.json "holdout" fingerprints, written by `llmrec train --holdout loo`) over these item ids and text
    vectors; else (False, why)."""
    path = Path(scorer_dir) / META_FILE
    if not path.is_file():
        return False, f"no {path}"
    hold = json.loads(path.read_text()).get("holdout") or {}
    if not hold:
        return False, "it was trained on every event (no holdout in its meta.json)"
    if hold.get("train_fingerprint") != frame_fingerprint(train):
        return False, "its training events differ from this split's"
    if hold.get("valid_fingerprint") != frame_fingerprint(valid):
        return False, "its validation events differ from this split's"
    sd = load_torch_file(Path(scorer_dir) / SCORER_MODEL_FILE)["model"]  # tensors only: never runs code
    ids = np.load(Path(scorer_dir) / INDEX_IDS_FILE, allow_pickle=False)
    if len(ids) != items.n_items or not np.array_equal(ids.astype(str), items.item_ids.astype(str)):
        return False, "its item ids differ from the evaluation's"
    if not np.array_equal(sd["text_vectors"].numpy(), np.asarray(items.text_vectors, np.float32)):
        return False, "its item text vectors differ from this split's"
    return True, ""


class NeuralOnlyView:
    """`<name>_neural`: an LLMRecRecommender's scorer without the co-occurrence term (text + ID towers, and
    the MLP head when on). It shares the parent's fit, so list it after the parent; its own `fit` only checks
    that the parent was fitted on the same call sequence."""

    def __init__(self, parent: LLMRecRecommender):
        self.parent = parent
        self.name = f"{parent.name}_neural"

    def fit(self, train: pd.DataFrame, items: ItemSpace) -> None:
        if self.parent.scorer is None:
            raise RuntimeError(f"{self.name}: fit {self.parent.name} first (this view shares its scorer)")

    def score(self, histories: list[History]) -> np.ndarray:
        return self.parent.score(histories, use_cooc=False)
