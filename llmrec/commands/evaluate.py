"""`llmrec evaluate`: split the interactions, fit llmrec + tuned baselines per protocol, full-ranking metrics.

Writes OUT/metrics.json (`{"loo": {...}, "time": {...}}`), OUT/metrics_<protocol>.json, per_user.parquet,
report.md, metrics.png and meta.json; see `llmrec.eval.evaluate` for the layout and choices, and prints the
results table. `--protocol loo,time,cold` adds the held-out-items protocol (10% of the items and all their
events held out; `--cold-frac`).

Presets (explicit --protocol / --models / --seeds override them):
- default: loo,time; every model (llmrec, llmrec_neural, the tuned baselines, both hybrids); 1 seed.
- `--fast` (what `llmrec pipeline` runs): loo; llmrec, popularity, item-kNN, EASE, zero-shot text and the
  hybrids; 1 seed; the run's scorer is evaluated itself when `llmrec train --holdout loo` trained it on this
  very split (else llmrec is trained once).
- `--full` (reviewer grade, `make eval`): loo,time,cold; every model; 3 seeds.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from llmrec.schema import RUN_EMBEDDINGS, RUN_SCORER
from llmrec.storage import Arg, In, Out, Run

logger = logging.getLogger(__name__)

HELP = "offline evaluation (leave-last-out, time split, held-out items) of llmrec and baselines: metrics.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data", required=True, help="folder written by `llmrec prepare` (items/interactions.parquet)"
    )
    p.add_argument(
        "--run",
        required=True,
        help="run folder holding embeddings/ (and scorer/, whose settings "
        "llmrec is retrained with on each split)",
    )
    p.add_argument("--out", required=True, help="output folder (e.g. RUN/eval)")
    preset = p.add_mutually_exclusive_group()
    preset.add_argument("--fast", action="store_true",
                        help="the pipeline's quick set: loo, llmrec + the strongest baselines + hybrids, 1 "
                        "seed, the run's scorer reused when it was trained on the loo split")
    preset.add_argument("--full", action="store_true",
                        help="reviewer grade: loo,time,cold, every model tuned, 3 seeds (mean +- sd)")
    p.add_argument(
        "--protocol",
        default=None,
        help="comma list of loo,time,cold (default loo,time; --fast loo; --full loo,time,cold; cold = "
        "held-out items, every target unseen in training)",
    )
    p.add_argument(
        "--models",
        default=None,
        # the names of llmrec.eval.models.ALL_MODELS / FAST_MODELS, written out so that `llmrec --help` does
        # not import the models (scipy, +1.5 s); tests/test_baselines.py checks this text against them
        help="comma list of llmrec,popularity,itemknn,als,bpr,ease,sasrec,zeroshot_text,served_text,"
        "zeroshot_text_new,hybrid_text_itemknn,hybrid_id_itemknn (default all; --fast: llmrec,popularity,"
        "itemknn,ease,zeroshot_text,served_text + hybrids)",
    )
    p.add_argument("--seeds", type=int, default=None,
                   help="training seeds per protocol, reported as mean +- sd (default 1; --full 3)")
    p.add_argument("--item-text", choices=["before-cutoff", "as-prepared"], default="before-cutoff",
                   help="user-written item text (MovieLens tags, Amazon reviews): rebuilt per split from "
                   "what was written before its cutoff (default), or the prepared text with everything")
    p.add_argument("--max-test-users", type=int, default=None, help="evaluate a seeded sample of test users")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed for training, the user sample and the cold protocol's held-out items (default 0)",
    )
    p.add_argument(
        "--time-test-frac",
        type=float,
        default=0.1,
        help="share of events after the time protocol's cutoff (default 0.1)",
    )
    p.add_argument(
        "--time-cutoff",
        type=int,
        default=None,
        help="explicit time-protocol cutoff ts (events with ts <= it are train); overrides --time-test-frac",
    )
    p.add_argument(
        "--cold-frac",
        type=float,
        default=0.1,
        help="share of the items the cold protocol holds out with all their events (default 0.1)",
    )
    p.add_argument(
        "--epochs", type=int, default=None, help="llmrec training epochs (default: the run scorer's)"
    )
    p.add_argument(
        "--num-workers", type=int, default=None, help="llmrec Ray Train workers (default: the run's)"
    )
    p.add_argument(
        "--time-targets",
        choices=["first", "all"],
        default="first",
        help="time protocol targets: each test user's first post-cutoff event (default), or all of them",
    )
    p.add_argument(
        "--sasrec-threads", type=int, default=None, help="torch threads for SASRec (default: torch's)"
    )
    p.add_argument("--sasrec-epochs", type=int, default=None,
                   help="SASRec baseline's maximum epochs (default 50; early stopping on validation ends "
                   "sooner)")


def storage_args(args: argparse.Namespace) -> dict[str, Arg]:
    """Flags that may be URIs (llmrec.cli stages them); of a run URI only embeddings/ and scorer/ are read."""
    return {"data": In("prepare"), "run": Run((RUN_EMBEDDINGS, RUN_SCORER)), "out": Out()}


def run(args: argparse.Namespace) -> int:
    from llmrec.eval.evaluate import evaluate

    run_dir = Path(args.run)
    emb = run_dir / RUN_EMBEDDINGS
    if not emb.is_dir():
        raise FileNotFoundError(f"{emb} not found; run `llmrec embed --items {args.data} --out {emb}` first")
    protocols, models, n_seeds = resolve_preset(args)
    if args.max_test_users is not None and args.max_test_users < 1:
        raise ValueError(f"--max-test-users must be >= 1, got {args.max_test_users}")
    llmrec_kwargs = {
        k: v for k, v in (("epochs", args.epochs), ("num_workers", args.num_workers)) if v is not None
    }
    sasrec = {k: v for k, v in (("epochs", args.sasrec_epochs), ("num_threads", args.sasrec_threads)) if v}
    baseline_kwargs = {"sasrec": sasrec} if sasrec else None
    results = evaluate(
        args.data,
        emb,
        args.out,
        protocols=protocols,
        models=models,
        max_test_users=args.max_test_users,
        seed=args.seed,
        scorer_dir=run_dir / RUN_SCORER,
        llmrec_kwargs=llmrec_kwargs,
        baseline_kwargs=baseline_kwargs,
        time_test_frac=args.time_test_frac,
        time_cutoff_ts=args.time_cutoff,
        time_targets=args.time_targets,
        cold_frac=args.cold_frac,
        n_seeds=n_seeds,
        item_text=args.item_text,
        reuse_scorer=args.fast,
    )
    from llmrec.eval.report import results_table

    print(results_table(results))
    for proto, res in results.items():
        best = max(res["models"], key=lambda m: res["models"][m]["ndcg@10"])
        print(
            f"{proto}: {res['n_users']} users x {res['n_items']} items; best ndcg@10: {best} "
            f"({res['models'][best]['ndcg@10']:.4f})"
        )
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


def resolve_preset(args: argparse.Namespace) -> tuple[list[str], list[str] | None, int]:
    """(protocols, models (None = all), seeds) from --fast / --full and the explicit flags, which win."""
    from llmrec.eval.evaluate import DEFAULT_PROTOCOLS, FAST_MODELS

    if args.full:
        protocols, models, seeds = ["loo", "time", "cold"], None, 3
    elif args.fast:
        protocols, models, seeds = ["loo"], list(FAST_MODELS), 1
    else:
        protocols, models, seeds = list(DEFAULT_PROTOCOLS), None, 1
    if args.protocol:
        protocols = [s.strip() for s in args.protocol.split(",") if s.strip()]
    if args.models:
        models = [s.strip() for s in args.models.split(",") if s.strip()]
    if args.seeds is not None:
        if args.seeds < 1:
            raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
        seeds = args.seeds
    return protocols, models, seeds
