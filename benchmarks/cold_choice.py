"""The cold-item choice of a trained scorer, on validation: what each (imputation, bonus, slots) triple costs
the warm-target users and buys the users whose target is a new item (issue 11: cold items vs the warm
protocols).

Loads RUN/scorer (trained with `--holdout loo`), rebuilds its validation exactly as training did (the same
leave-last-out split and `val_users` sample; `reusable_scorer` checks the meta.json "holdout" fingerprints,
item ids and text vectors) and its co-occurrence term from the training events, then runs
`llmrec.scorer.finalize.tune_cold_bonus` (a seeded tenth of the warm items made cold) over `--impute-grid` x
`--bonus-grid` x `--every-grid` (cold-item slots: one item without an ID embedding in every that many
positions, 0 = none) x `--keep-grid` (neural places: a cold item no lower than that many times its place
without the co-occurrence term, 0 = off). Prints the overall validation NDCG@10 by bonus and that of the users
whose target was made cold, per imputation, per slot setting and per neural place (each at the other chosen
values), and the setting the rule picks. Only validation is read: the test split is never scored here.

    python benchmarks/cold_choice.py --run runs/amazon-magazine-subscriptions-2018 \\
        --impute-grid 0 0.5 1 2 4 8 --out runs/bench/cold-choice-magazine.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from llmrec.artifacts import write_json_report
from llmrec.scorer.finalize import COLD_BONUS_GRID, COLD_EVERY_GRID, COLD_IMPUTE_GRID, COLD_KEEP_GRID


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="run folder: data/, embeddings/, scorer/ (loo)")
    p.add_argument("--scorer", default=None, help="scorer folder (default RUN/scorer)")
    p.add_argument("--impute-grid", type=float, nargs="+", default=list(COLD_IMPUTE_GRID))
    p.add_argument("--bonus-grid", type=float, nargs="+", default=list(COLD_BONUS_GRID))
    p.add_argument("--every-grid", type=int, nargs="+", default=list(COLD_EVERY_GRID))
    p.add_argument("--keep-grid", type=float, nargs="+", default=list(COLD_KEEP_GRID))
    p.add_argument("--tie-on", choices=("all", "warm"), default="all",
                   help="judge the tie on all validation users (training's rule) or the warm-target ones")
    p.add_argument("--out", default=None, help="also write the JSON report here")
    args = p.parse_args(argv)
    report = measure(Path(args.run), Path(args.scorer) if args.scorer else Path(args.run) / "scorer",
                     args.impute_grid, args.bonus_grid, args.every_grid, args.tie_on, args.keep_grid)
    write_json_report(report, args.out, indent=1, echo=True)
    return 0


def measure(run: Path, scorer_dir: Path, impute_grid: list[float], bonus_grid: list[float],
            every_grid: list[int], tie_on: str = "all", keep_grid: list[float] | None = None
            ) -> dict[str, Any]:
    from llmrec.commands.train import loo_holdout
    from llmrec.data.tables import read_interactions, read_items
    from llmrec.embed.artifact import load_item_space
    from llmrec.scorer.data import build_validation
    from llmrec.scorer.finalize import cooc_matrix, tune_cold_bonus
    from llmrec.scorer.inference import Scorer
    from llmrec.scorer.recommender import reusable_scorer

    meta = json.loads((scorer_dir / "meta.json").read_text())
    hold, cfg = meta.get("holdout") or {}, meta["config"]
    if hold.get("protocol") != "loo":
        raise SystemExit(f"{scorer_dir} was trained with holdout {hold.get('protocol')!r}; this needs a "
                         "scorer trained with `llmrec train --holdout loo` (its validation can be rebuilt)")
    t0 = time.perf_counter()
    data = run / "data"
    items, embed_meta = load_item_space(run / "embeddings", read_items(data))
    train, valid, items, _ = loo_holdout(read_interactions(data), items, str(data), embed_meta,
                                         cfg["val_users"], cfg["seed"])
    same, why = reusable_scorer(scorer_dir, train, valid, items)
    if not same:
        raise SystemExit(f"{scorer_dir} was not trained on the split rebuilt from {data} ({why}): same data?")
    val = build_validation(train, valid, items, max_len=cfg["max_len"], min_rating=cfg.get("min_rating"))
    model = Scorer.load(scorer_dir).model
    term = meta["cooc"].get("term")
    sim = cooc_matrix(train, items, cfg["cooc_neighbors"], term) if term else None
    bonus, info = tune_cold_bonus(model, val, sim, cfg["n_candidates"], grid=bonus_grid,
                                  impute_grid=impute_grid, every_grid=every_grid, tie_on=tie_on,
                                  keep_grid=COLD_KEEP_GRID if keep_grid is None else keep_grid)
    return {
        "run": str(run), "scorer": str(scorer_dir), "term": term, "cooc_weight": model.cfg.cooc_weight,
        "shipped": {"cold_bonus": meta["model_config"].get("cold_bonus"),
                    "cooc_impute": meta["model_config"].get("cooc_impute"),
                    "cold_every": meta["model_config"].get("cold_every", 0),
                    "cold_keep": meta["model_config"].get("cold_keep", 0.0)},
        "picked": {"cold_bonus": bonus, "cooc_impute": info["cooc_impute"], "cold_every": info["cold_every"],
                   "cold_keep": info["cold_keep"]},
        "tie_on": tie_on, "val_ndcg_at_pick": info.get("val_ndcg"),
        "val_ndcg_warm_targets_at_pick": info.get("val_ndcg_warm_targets"),
        "bonus_grid": info["grid"], "impute_grid": info["impute_grid"], "every_grid": info["every_grid"],
        "keep_grid": info.get("keep_grid"),
        "n_cold_targets": info["n_cold_targets"], "n_pseudo_cold_items": info["n_pseudo_cold_items"],
        "val_ndcg_by_impute": info.get("val_ndcg_by_impute"), "measured": info["measured"],
        "val_ndcg_cold_targets_by_impute": info.get("val_ndcg_cold_targets_by_impute"),
        "val_ndcg_by_every": info.get("val_ndcg_by_every"),
        "val_ndcg_cold_targets_by_every": info.get("val_ndcg_cold_targets_by_every"),
        "val_ndcg_by_keep": info.get("val_ndcg_by_keep"),
        "val_ndcg_cold_targets_by_keep": info.get("val_ndcg_cold_targets_by_keep"),
        "seconds": round(time.perf_counter() - t0, 1),
    }


if __name__ == "__main__":
    sys.exit(main())
