"""The cold-item choice under the cold protocol: is the made-cold validation a good proxy for held-out items?

Trains llmrec on the cold split of a prepared run (`llmrec.eval.split.cold_item_split`, 10% of the items
held out with all their events, seed 0) exactly as `llmrec evaluate --protocol cold` does, into `--out`
(reused when it is already there), then makes its cold-item choice (`llmrec.scorer.finalize.tune_cold_bonus`)
twice on the scorer's own validation: as training does, and with the items that have no ID embedding (the
held-out test items, which have no validation event and can only be distractors there) left out of every
validation user's ranking. Each pick, and the neural towers alone, are then scored on the cold protocol's test
(`llmrec.eval.evaluate.evaluate_models`: NDCG@10 of the held-out targets, the figure of `llmrec evaluate
--protocol cold`). The picks are made on validation only; the test scores them once. This is the measurement
that showed the made-cold validation to be the failing proxy; `llmrec evaluate --protocol cold` now makes
the choice on items held out of the training split instead (`llmrec.eval.cold_choice`).

    python benchmarks/cold_split_choice.py --run runs/amazon-magazine-subscriptions-2018 \\
        --out runs/bench/cold-split-magazine --report runs/bench/cold-split-choice-magazine.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from llmrec.artifacts import write_json_report


class _Fitted:
    """An `LLMRecRecommender` holding an already fitted scorer, as an evaluation model: `fit` does nothing
    (`evaluate_models` calls it), `score` is the recommender's."""

    def __init__(self, rec: Any) -> None:
        self.rec, self.name = rec, rec.name

    def fit(self, train: Any, items: Any) -> None:
        pass

    def score(self, histories: list) -> np.ndarray:
        return self.rec.score(histories)


def measure(run: Path, out: Path) -> dict[str, Any]:
    from llmrec.data.histories import attach_item_idx
    from llmrec.data.item_text import read_text_events
    from llmrec.embed.artifact import load_item_space
    from llmrec.eval.evaluate import evaluate_models, read_tables
    from llmrec.eval.models import llmrec_train_config
    from llmrec.eval.split import cold_item_split
    from llmrec.eval.text_cutoff import split_item_space
    from llmrec.eval.tuning import InnerValidation
    from llmrec.scorer.data import build_validation
    from llmrec.scorer.finalize import COLD_CHOICES, cold_choices, cooc_matrix, tune_cold_bonus
    from llmrec.scorer.inference import Scorer
    from llmrec.scorer.recommender import LLMRecRecommender, NeuralOnlyView

    t0 = time.perf_counter()
    items_df, inter = read_tables(run / "data")
    space, embed_meta = load_item_space(run / "embeddings", items_df)
    inter = attach_item_idx(inter, space, unknown="drop")
    split = cold_item_split(inter, frac=0.1, seed=0)
    pspace, _ = split_item_space(space, items_df, read_text_events(run / "data"), split, embed_meta, {})
    kw = {**llmrec_train_config(run / "scorer"), "seed": 0}
    val = InnerValidation.build(split.train, pspace.n_items, kw.get("val_users", 1000), 0, valid=None)
    if not (out / "model.pt").is_file():
        LLMRecRecommender(out_dir=out, validation=val, **kw).fit(split.train, pspace)
    meta = json.loads((out / "meta.json").read_text())
    cfg = meta["config"]
    model = Scorer.load(out).model
    vs = build_validation(val.train, val.valid, pspace, max_len=cfg["max_len"],
                          min_rating=cfg.get("min_rating"))
    term = meta["cooc"].get("term")
    sim = cooc_matrix(val.train, pspace, cfg["cooc_neighbors"], term) if term else None
    no_id = np.flatnonzero(model.id_slots.cpu().numpy() == 0)
    left_out = dataclasses.replace(vs, exclude=[np.union1d(e, no_id).astype(e.dtype) for e in vs.exclude])
    report: dict[str, Any] = {"run": str(run), "scorer": str(out), "n_no_id_items": int(len(no_id)),
                              "n_held_out_items": int(len(split.cold_items)),
                              "shipped": {k: meta["model_config"].get(k) for k in COLD_CHOICES},
                              "choices": {}}
    models = []
    for name, v in (("as training", vs), ("held-out items left out", left_out)):
        _, info = tune_cold_bonus(model, v, sim, cfg["n_candidates"])
        pick = cold_choices(info)
        report["choices"][name] = {"pick": pick, "n_cold_targets": info["n_cold_targets"],
                                   "val_ndcg_by_keep": info["val_ndcg_by_keep"],
                                   "val_ndcg_cold_targets_by_keep": info["val_ndcg_cold_targets_by_keep"],
                                   "bonus_grid": info["grid"]}
        rec = LLMRecRecommender(name=name, n_candidates=cfg["n_candidates"])
        rec.scorer = Scorer.load(out)
        rec.scorer.choose(**pick)
        models.append(_Fitted(rec))
    neural = NeuralOnlyView(models[0].rec)  # the towers are the same in every pick
    neural.name = "neural towers alone"
    models.append(neural)
    res, _, n_users = evaluate_models(split, pspace, models, None, 0, 256, label="cold")
    report["cold_test_ndcg@10"] = {m: float(r["ndcg@10"]) for m, r in res["models"].items()}
    report["n_test_users"] = int(n_users)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True,
                   help="prepared run folder: data/, embeddings/, scorer/ (its training config)")
    p.add_argument("--out", required=True, help="folder for the scorer trained on the cold split (reused)")
    p.add_argument("--report", default=None, help="also write the JSON report here")
    args = p.parse_args(argv)
    report = measure(Path(args.run), Path(args.out))
    write_json_report(report, args.report, indent=1, echo=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
