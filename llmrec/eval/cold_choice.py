"""llmrec's cold-item choice made the way the cold protocol tests it: on items held out of training.

`llmrec train` chooses the cold-item bonus, imputation, slots and neural places (`llmrec.scorer.finalize.
COLD_CHOICES`) on a made-cold validation: a tenth of the trained items stripped of their ID embedding and
co-occurrences. Those items were trained as warm ones, and under the cold protocol (`llmrec.eval.split.
cold_item_split`) that proxy picks settings the never-trained held-out items do not reward (README,
"Neural places for cold items"). So under that protocol the choice is made on a validation of the same kind
as the test: `held_out_cold_choice` holds out a seeded share of the *training* split's items with all their
events (`cold_item_split` again, on the train frame only), trains llmrec alike on the rest, and picks the
settings whose NDCG@10 of the held-out targets (each validation user ranking the whole catalog, as served)
is best, text winning ties (`tune_cold_bonus` with `frac=0`). The final scorer is trained on the whole
training split as always and takes that pick instead of making the made-cold one (`fit_scorer(cold_pick=)`).
No test event is seen.

That choice (`TrainConfig.cold_choice` "held-out-new") serves a world where every next item is new, and costs
warm traffic dearly (Magazine leave-last-out NDCG@10 0.327 -> 0.084, MIND 0.097 -> 0.003, README). `llmrec
train --cold-choice held-out-new` makes the served scorer's choice so, on the events it trains on;
`llmrec evaluate` then makes it alike for that run under every protocol (and under the cold protocol for a
made-cold scorer too, whose proxy fails there). A variant that ranked the inner validation's warm targets
beside the held-out ones and kept only settings that cost the warm users nothing measurable was measured and
dropped: on Magazine it kept the warm figure but served new items worse than the made-cold choice (README).
"""

from __future__ import annotations

import logging
import tempfile
import time
from typing import Any

import pandas as pd

from llmrec.data.histories import attach_item_idx
from llmrec.eval.split import cold_item_split
from llmrec.eval.tuning import InnerValidation
from llmrec.protocol import ItemSpace

logger = logging.getLogger(__name__)

__all__ = ["HELD_OUT_FRAC", "held_out_cold_choice"]

# share of the training split's items held out for the choice (the cold protocol's own share)
HELD_OUT_FRAC = 0.1
# the inner model's own cold-item fields: never ranked with, as `tune_cold_bonus` tries every one of them on
# the held-out targets (the imputation only where there is a co-occurrence term to impute); handing them in
# spares the inner fit a made-cold choice of its own (a minute on Magazine)
INNER_PICK = {"cold_bonus": 0.0, "cooc_impute": 1.0, "cold_every": 0, "cold_keep": 0.0}


def held_out_cold_choice(
    train: pd.DataFrame,
    items: ItemSpace,
    train_kwargs: dict[str, Any],
    seed: int = 0,
    frac: float = HELD_OUT_FRAC,
    max_users: int | None = 2000,
) -> tuple[dict[str, float], dict[str, Any]]:
    """The cold-item fields of `llmrec.scorer.finalize.COLD_CHOICES`, chosen on items held out of `train`.

    Args:
        train: the split's train frame (canonical interactions; item_idx attached here when absent); test
            events never.
        items: the split's item space (held-out test items included: they stay distractors, as in the test).
        train_kwargs: `llmrec.config.TrainConfig` fields of the scorer (the same as the final fit's).
        seed: seeds the held-out items, the inner validation and training.
        frac: share of `train`'s items held out with all their events.
        max_users: at most this many validation users with a held-out target (seeded sample; None = all).

    Returns:
        (pick: {field: value} for every COLD_CHOICES field, summary for metrics.json: the inner split's
        counts, tune_cold_bonus's grids and validation NDCGs, seconds).
    """
    from llmrec.config import TrainConfig, config_from_dict
    from llmrec.scorer.data import build_validation
    from llmrec.scorer.finalize import cold_choices, tune_cold_bonus
    from llmrec.scorer.recommender import LLMRecRecommender

    t0 = time.perf_counter()
    train = attach_item_idx(train, items)  # kept where there (range-checked); an unknown item raises
    inner = cold_item_split(train, frac=frac, seed=seed)
    test = inner.test
    if max_users is not None and test["user_id"].nunique() > max_users:
        users = pd.Series(test["user_id"].unique()).sample(n=max_users, random_state=seed)
        test = test[test["user_id"].isin(set(users))]
    val_users = config_from_dict(TrainConfig, train_kwargs, "held_out_cold_choice").val_users  # None: all
    val = InnerValidation.build(inner.train, items.n_items, val_users, seed)
    with tempfile.TemporaryDirectory(prefix="llmrec-cold-choice-") as d:
        rec = LLMRecRecommender(name="llmrec (held-out items)", out_dir=d, validation=val,
                                cold_chooser=lambda _train, _items: (dict(INNER_PICK), {"inner": True}),
                                **{**train_kwargs, "seed": seed, "cold_choice": "held-out-new"})
        rec.fit(inner.train, items)
        assert rec.scorer is not None and rec.meta is not None
        cfg = rec.meta["config"]
        vs = build_validation(inner.train, test, items, max_len=cfg["max_len"],
                              min_rating=cfg.get("min_rating"))
        bonus, info = tune_cold_bonus(rec.scorer.model, vs, rec.scorer.cooc, cfg["n_candidates"], frac=0.0,
                                      seed=seed)
    pick = cold_choices(info)
    summary = {**info, "held_out": inner.stats, "frac": frac, "seed": seed,
               "n_validation_users": int(vs.n_users), "seconds": round(time.perf_counter() - t0, 1)}
    at = (f"validation NDCG@10 {info['val_ndcg'][info['grid'].index(bonus)]:.4f}" if info.get("measured")
          else info.get("why", ""))
    logger.info("cold-item choice on %d items held out of training (%d validation users, %d with a "
                "held-out target): %s (%s; %.0fs)", inner.stats["n_heldout_items"], vs.n_users,
                info["n_cold_targets"], pick, at, summary["seconds"])
    return pick, summary
