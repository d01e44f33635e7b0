"""`llmrec train`: prepared interactions + embeddings artifact -> scorer artifact (Ray Train TorchTrainer).

Trains the production model on all given interactions (the prepared table, plus the serving event log with
--events), holding out the last event of up to --val-users seeded-hash-chosen users (with >= 2 events) as the
validation target for early stopping and the post-training choices. The interactions are read and turned into
training samples on Ray Data in tasks (`llmrec.scorer.dataset`): the driver never loads them.

`--holdout loo` (what `llmrec pipeline` does) trains instead on the leave-last-out training split of
`llmrec evaluate` (llmrec.eval.split.leave_last_out with --seed): every user with >= 3 events keeps their last
event out (the evaluation's test target) and their second-to-last as validation (up to --val-users of them,
the events the baselines are tuned on), and user-written item text (tags, reviews) is rebuilt from what was
written before those events. meta.json records `holdout` (fingerprints of the train and validation events),
so `llmrec evaluate --fast` scores this very artifact instead of training another: what is evaluated is what
is served. The price: the served model has not learnt from each user's last two events (it still sees them
in a user's history when it recommends).

`--cold-choice held-out-new` chooses the cold-item bonus, imputation, slots and neural places on a tenth of
the training items held out of a second, inner training (`llmrec.eval.cold_choice`) instead of on trained
items made cold, every validation target new: for traffic whose next item is nearly always new, as in
the cold protocol; it costs warm traffic dearly (README). About twice the training time, and this process
then reads the interactions (the inner training runs on frames).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from llmrec import storage
from llmrec.config import HELD_OUT_KINDS, TrainConfig, add_config_arguments, config_from_args
from llmrec.storage import Arg, In, Out

logger = logging.getLogger(__name__)

HELP = "train the scorer (user encoder + MLP re-ranker) on Ray Train from interactions and item embeddings"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="folder written by `llmrec prepare` (interactions.parquet)")
    p.add_argument("--embeddings", required=True, help="folder written by `llmrec embed`")
    p.add_argument("--out", required=True, help="scorer folder (model.pt, item_ids.npy, meta.json, ray/)")
    p.add_argument(
        "--events", default=None, help="serving event log folder: its item events are added to the data"
    )
    # every training option (--epochs, --batch-size, --lr, --dim, ...) is a field of TrainConfig: one flag per
    # field, with the field's default and help (llmrec/config.py)
    add_config_arguments(p, TrainConfig)
    p.add_argument(
        "--holdout", choices=["none", "loo"], default="none",
        help="none: train on every event (default); loo: train on the leave-last-out split that `llmrec "
        "evaluate --fast` evaluates (each user's last event held out, the one before it the validation), so "
        "the evaluation scores this very model",
    )
    p.add_argument(
        "--resume",
        default=None,
        metavar="CKPT_DIR",
        help="continue from a Ray checkpoint folder or an earlier --out folder (its last checkpoint)",
    )
    p.add_argument(
        "--checkpoint-dir", default=None,
        help="Ray Train checkpoint storage every node reaches: a shared folder or a URI (s3://bucket/ckpt); "
        "default OUT/ray on this machine (single-node clusters only), or OUT-ray beside a URI --out",
    )
    p.add_argument("--address", default=None, help="Ray cluster address (default: embedded local Ray)")


def storage_args(args: argparse.Namespace) -> dict[str, Arg]:
    """Flags that may be URIs (llmrec.cli stages them).

    Also, for a URI --out without --checkpoint-dir, sets args.checkpoint_dir to `checkpoint_uri(out)`: the
    staged --out is a folder on this process's node, which Ray Train workers on other nodes cannot write
    their checkpoints to (Ray fails "Unable to set up cluster storage"); cli calls this before staging.
    """
    if args.checkpoint_dir is None and storage.is_uri(args.out):
        args.checkpoint_dir = checkpoint_uri(args.out)
    return {
        "data": In("prepare"),
        "embeddings": In("embed"),
        # the serving event log: its meta.json (if any) does not change as events are appended
        "events": In(by_listing=True),
        "resume": In(),
        "out": Out(),
    }


def checkpoint_uri(out: str) -> str:
    """Ray Train's run storage for a URI --out: a sibling folder, `s3://b/run/scorer?q` ->
    `s3://b/run/scorer-ray?q` (not inside --out, whose upload replaces that folder as a whole)."""
    head, sep, query = out.partition("?")
    return head.rstrip("/") + "-ray" + sep + query


def run(args: argparse.Namespace) -> int:
    from llmrec.data.tables import read_interactions, read_items
    from llmrec.embed.artifact import load_item_space
    from llmrec.raysetup import init_ray
    from llmrec.schema import INTERACTIONS_FILE
    from llmrec.scorer.train import fit_scorer

    cfg = config_from_args(TrainConfig, args)
    # titles, facets (synthesised text feedback) and the encoder of the item vectors come with the item space
    items, embed_meta = load_item_space(args.embeddings, read_items(args.data))
    holdout, valid_df = None, None
    if args.holdout == "loo":
        # the evaluated split, built as `llmrec evaluate` builds it (whose baselines hold the same frames);
        # the samples are still built on Ray Data inside fit_scorer
        import pandas as pd

        inter = read_interactions(args.data)
        n_data = len(inter)
        if args.events:
            from llmrec.state.event_log import read_events

            extra = read_events(args.events)
            inter = pd.concat([inter, extra[inter.columns]], ignore_index=True)
            logger.info("added %d events from the serving log %s", len(extra), args.events)
        source, valid, items, holdout = loo_holdout(
            inter, items, args.data, embed_meta, cfg.val_users, cfg.seed
        )
        valid_df = valid if len(valid) else None
        logger.info("train: %d interactions (%d from --data), %d validation targets, %d test events held out "
                    "(--holdout loo)", len(inter), n_data, len(valid), holdout["n_test_held_out"])
    init_ray(address=args.address)
    extra = None
    if holdout is None:  # every event: the interactions are read by Ray Data tasks, never by this process
        import ray.data

        from llmrec.scorer.dataset import source_dataset

        source = source_dataset(str(Path(args.data) / INTERACTIONS_FILE))
        if args.events:
            from llmrec.state.event_log import read_events

            extra = read_events(args.events)  # the serving log is read here, then handed to Ray Data
            source = source.union(ray.data.from_pandas(extra)) if len(extra) else source
            logger.info("added %d events from the serving log %s", len(extra), args.events)
    cold_pick = None
    if cfg.cold_choice in HELD_OUT_KINDS:
        import dataclasses

        from llmrec.eval.cold_choice import held_out_cold_choice

        if holdout is None:  # the held-out choice trains on frames: this process reads the interactions
            import pandas as pd

            frame = read_interactions(args.data)
            if extra is not None and len(extra):
                frame = pd.concat([frame, extra[frame.columns]], ignore_index=True)
        else:
            frame = source
        cold_pick = held_out_cold_choice(frame, items, dataclasses.asdict(cfg), seed=cfg.seed)
    meta = fit_scorer(
        cfg,
        source,
        items,
        args.out,
        valid_df=valid_df,
        resume_from=args.resume,
        embed_meta=embed_meta,
        checkpoint_dir=args.checkpoint_dir,
        cold_pick=cold_pick,
    )
    if holdout is not None:
        from llmrec.artifacts import write_meta

        own = ("schema_version", "stage", "created_at", "code_version")
        kept = {k: v for k, v in meta.items() if k not in own}
        meta = write_meta(args.out, "train", **kept, holdout=holdout)
    m = meta["metrics"]
    rerank = meta.get("model_config", {}).get("rerank", True)
    key = "val" if rerank else "val_retrieval"  # the ranking the saved model serves with
    cooc = meta.get("cooc", {})
    w = meta.get("model_config", {}).get("cooc_weight", 0.0)
    with_cooc = cooc.get("val_ndcg_by_weight", {}).get(f"{w:.6g}")
    print(
        f"scorer -> {args.out}: best epoch {meta['best_epoch']}, re-ranker {'on' if rerank else 'off'}, "
        f"val ndcg@10 {m.get(f'{key}_ndcg@10', float('nan')):.4f}, "
        f"recall@10 {m.get(f'{key}_recall@10', float('nan')):.4f}, "
        + (f"co-occurrence weight {w:.4g} (val ndcg@10 {with_cooc:.4f}), " if with_cooc is not None else "")
        + f"cold-item choice {meta.get('cold_bonus', {}).get('method', cfg.cold_choice)}, "
        + f"{meta['wall_s']:.1f}s"
    )
    return 0


def loo_holdout(
    inter: Any, items: Any, data_dir: str, embed_meta: dict, val_users: int | None, seed: int
) -> tuple[Any, Any, Any, dict]:
    """(train, valid, item space, meta "holdout") of the leave-last-out split `llmrec evaluate` builds with
    this seed: its train, a `val_users` sample of its validation events, its item space (user-written text
    rebuilt before each writer's held-out events)."""
    from llmrec.data.item_text import read_text_events
    from llmrec.data.order import frame_fingerprint, sample_rows
    from llmrec.data.tables import read_items
    from llmrec.eval.split import leave_last_out
    from llmrec.eval.text_cutoff import split_item_space

    split = leave_last_out(inter, seed=seed)
    valid = sample_rows(split.valid, val_users, seed)
    text = read_text_events(data_dir)
    items, text_info = split_item_space(items, read_items(data_dir), text, split, embed_meta)
    holdout = {
        "protocol": "loo",
        "seed": seed,
        "val_users": val_users,
        "train_fingerprint": frame_fingerprint(split.train),
        "valid_fingerprint": frame_fingerprint(valid),
        "n_train": len(split.train),
        "n_valid": len(valid),
        "n_test_held_out": len(split.test),
        "item_text": text_info,
    }
    return split.train, valid, items, holdout
