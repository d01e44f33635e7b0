"""`llmrec replay`: stream post-cutoff events through the real state update; online vs frozen Recall/NDCG."""

from __future__ import annotations

import argparse
import json
import logging
import os

from llmrec import schema
from llmrec.serve.auth import ARGV_REFUSED, read_token
from llmrec.storage import Arg, In, Out, Run, is_uri, join

logger = logging.getLogger(__name__)

HELP = "replay the last 10%% of events in time order: next-event Recall@10/NDCG@10, online vs frozen state"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run folder (embeddings/, index/, optional scorer/)")
    p.add_argument(
        "--data", required=True, help="folder with the canonical interactions.parquet (e.g. RUN/data)"
    )
    p.add_argument(
        "--url", default=None, help="replay through a running `llmrec serve` (default: in-process)"
    )
    p.add_argument(
        "--max-events", type=int, default=2000, help="stream at most N events (0 = all; default 2000)"
    )
    p.add_argument("--k", type=int, default=10, help="list length (default 10)")
    p.add_argument(
        "--test-frac", type=float, default=0.1, help="fraction of events after the cutoff (default 0.1)"
    )
    p.add_argument("--out", default=None, help="folder for replay.json (default RUN/eval)")
    p.add_argument(
        "--learn-every", type=int, default=0,
        help="also replay with the learning loop: a `llmrec learn` round every N streamed events, its model "
        "ranking a third list (in-process only; RUN/scorer must be trained on pre-cutoff events; 0 = off)",
    )
    p.add_argument("--learn-max-steps", type=int, default=200,
                   help="batches per fine-tune epoch of each learning round (default 200)")
    p.add_argument("--learn-epochs", type=int, default=1, help="epochs of each learning round (default 1)")
    p.add_argument("--learn-num-workers", type=int, default=1,
                   help="Ray Train workers of each learning round (default 1; 0 = in this process, Ray "
                   "Train's local mode: no worker processes to start, a fresher model)")
    p.add_argument("--learn-choices", default="refit", choices=("refit", "reuse"),
                   help="post-training choices of each learning round (`llmrec learn --choices`)")
    p.add_argument("--auth-token-file", default=None,
                   help="file holding the server's bearer token (with --url; default: $LLMREC_AUTH_TOKEN)")
    p.add_argument("--auth-token", default=None, help=argparse.SUPPRESS)  # refused: see llmrec.serve.auth


def storage_args(args: argparse.Namespace) -> dict[str, Arg]:
    """Flags that may be URIs (llmrec.cli stages them); replay.json is added to --out, replacing nothing."""
    if args.out is None and is_uri(args.run):
        args.out = join(args.run, schema.RUN_EVAL)  # the default RUN/eval, on the run's own storage
    parts = (schema.RUN_DATA, schema.RUN_EMBEDDINGS, schema.RUN_INDEX, schema.RUN_SCORER, schema.RUN_EVAL)
    return {"run": Run(parts), "data": In("prepare"), "out": Out("add")}


def run(args: argparse.Namespace) -> int:
    from llmrec.eval.replay import replay

    if args.max_events < 0:
        raise ValueError(f"--max-events must be >= 0 (0 = all), got {args.max_events}")
    if args.auth_token:
        raise ValueError(ARGV_REFUSED)
    if min(args.learn_every, args.learn_num_workers) < 0 or min(args.learn_max_steps, args.learn_epochs) < 1:
        raise ValueError(
            f"--learn-every and --learn-num-workers must be >= 0, --learn-max-steps and --learn-epochs >= 1; "
            f"got {args.learn_every}, {args.learn_num_workers}, {args.learn_max_steps}, {args.learn_epochs}"
        )
    out = replay(
        args.run,
        args.data,
        url=args.url,
        max_events=args.max_events or None,
        k=args.k,
        test_frac=args.test_frac,
        out_dir=args.out,
        auth_token=read_token(args.auth_token_file, os.environ) if args.url else None,
        learn_every=args.learn_every or None,
        learn_config={"max_steps": args.learn_max_steps, "epochs": args.learn_epochs,
                      "num_workers": args.learn_num_workers, "choices": args.learn_choices},
    )
    k = args.k
    print(
        json.dumps(
            {m: out[m] for m in ("online", "frozen", "learning", "gain", "gain_learning", "diff_ci95",
                                 "model_freshness") if m in out}
            | {"n_targets": out["n_targets"]},
            indent=2,
        )
    )
    logger.info(
        "online Recall@%d %.4f vs frozen %.4f", k, out["online"][f"recall@{k}"], out["frozen"][f"recall@{k}"]
    )
    return 0
