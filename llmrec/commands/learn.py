"""`llmrec learn`: one round of the learning loop (`llmrec.learn`): fine-tune the serving scorer on the
feedback logged since it was trained, judge it against the current one on held-back newest events, and make it
current in the run's model registry (RUN/models.json) only when it is not worse. A running `llmrec serve` on
the run notices the registry and swaps the model in without a redeploy; `GET /admin/model` shows which one
serves and why; `--rollback` (or `POST /admin/model {"rollback": true}`) serves the previous one again.

Run it on a schedule (cron, `ray job submit ... -- python -m jobs.learn --run RUN`), or after a batch of
events. Prints one JSON line: accepted, why, the held-back metrics of both models, the candidate folder.
"""

from __future__ import annotations

import argparse
import json
import logging

logger = logging.getLogger(__name__)

HELP = "fine-tune the serving scorer on new feedback; serve it only when it is not worse on held-back events"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run folder (data/, embeddings/, scorer/ or models.json)")
    p.add_argument("--events", default=None, help="serving event log folder (default RUN/events)")
    p.add_argument(
        "--data", default=None, help="interactions the current model learned from (default RUN/data)"
    )
    p.add_argument("--epochs", type=int, default=1, help="fine-tune epochs (default 1)")
    p.add_argument("--max-steps", type=int, default=200, help="batches per epoch at most (default 200)")
    p.add_argument(
        "--holdback-frac",
        type=float,
        default=0.2,
        help="share of the new events (newest) held back to judge the candidate (default 0.2)",
    )
    p.add_argument(
        "--min-new-events", type=int, default=20, help="fewer new events -> do nothing (default 20)"
    )
    p.add_argument("--lr", type=float, default=None, help="fine-tune learning rate (default: the model's)")
    p.add_argument("--num-workers", type=int, default=1,
                   help="Ray Train workers (default 1; 0 = in this process, Ray Train's local mode)")
    p.add_argument("--choices", default="refit", choices=("refit", "reuse"),
                   help="post-training choices of the candidate (co-occurrence weight, text boosts, "
                   "cold-item choices): choose them again on validation (refit, default) or keep the current "
                   "model's (reuse: a round in about half the time, a slightly worse model measured)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rollback", action="store_true", help="serve the previous model again and exit")
    p.add_argument("--address", default=None, help="Ray cluster address (default: embedded local Ray)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from llmrec import schema
    from llmrec.learn import learn, rollback

    if args.rollback:
        reg = rollback(args.run, "rollback by `llmrec learn --rollback`")
        print(json.dumps({"rolled_back_to": reg["current"]["scorer_dir"]}))
        return 0
    from llmrec.raysetup import init_ray

    events = args.events or str(Path(args.run) / schema.RUN_EVENTS)
    if not Path(events).is_dir():
        raise FileNotFoundError(
            f"no serving event log at {events}; pass --events DIR (the folder of `llmrec serve`)"
        )
    init_ray(address=args.address)
    res = learn(
        args.run,
        events,
        data_dir=args.data,
        epochs=args.epochs,
        max_steps=args.max_steps,
        holdback_frac=args.holdback_frac,
        min_new_events=args.min_new_events,
        lr=args.lr,
        num_workers=args.num_workers,
        seed=args.seed,
        choices=args.choices,
    )
    print(json.dumps(res.to_dict()))
    return 0
