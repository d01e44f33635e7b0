"""`llmrec train`: prepared interactions + embeddings artifact -> scorer artifact (Ray Train TorchTrainer).

Trains the production model on all given interactions (the prepared table, plus the serving event log with
--events), holding out the last event of up to --val-users seeded-hash-chosen users (with >= 2 events) as the
validation target for early stopping and the post-training choices. The interactions are read and turned into
training samples on Ray Data in tasks (`llmrec.scorer.dataset`): the driver never loads them.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

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
    p.add_argument(
        "--num-workers", type=int, default=1, help="Ray Train workers, 1 CPU (or GPU) each (default 1)"
    )
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker")
    p.add_argument(
        "--epochs", type=int, default=10, help="maximum epochs; early stopping may end sooner (default 10)"
    )
    p.add_argument("--batch-size", type=int, default=256, help="global batch size (default 256)")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (default 3e-3)")
    p.add_argument(
        "--patience", type=int, default=2, help="epochs without a better val ndcg@10 before stopping"
    )
    p.add_argument("--dim", type=int, default=64, help="model / retrieval dim (default 64)")
    p.add_argument(
        "--n-neg", type=int, default=128,
        help="sampled negatives per batch (default 128); -1 = full softmax over the whole catalog",
    )
    p.add_argument(
        "--max-len", type=int, default=50, help="history events the user encoder reads (default 50)"
    )
    p.add_argument(
        "--val-users", type=int, default=1000,
        help="hold out the last event of this many random users (>= 2 events) for validation / early "
        "stopping (default 1000; -1 = every such user); every other event is trained on",
    )
    p.add_argument(
        "--cooc-neighbors", type=int, default=100,
        help="item co-occurrence neighbours kept per item for the ranking's co-occurrence term, whose weight is "
        "chosen on validation (default 100; 0 = neural ranking only)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--resume",
        default=None,
        metavar="CKPT_DIR",
        help="continue from a Ray checkpoint folder or an earlier --out folder (its last checkpoint)",
    )
    p.add_argument(
        "--checkpoint-dir", default=None,
        help="Ray Train checkpoint storage every node reaches: a shared folder or a URI (s3://bucket/ckpt); "
        "default OUT/ray on this machine (single-node clusters only)",
    )
    p.add_argument(
        "--max-failures", type=int, default=0,
        help="worker failures to recover from by restarting the workers from the last checkpoint (default 0)",
    )
    p.add_argument("--address", default=None, help="Ray cluster address (default: embedded local Ray)")


def storage_args(args: argparse.Namespace) -> dict[str, Arg]:
    """Flags that may be URIs (llmrec.cli stages them)."""
    return {
        "data": In("prepare"),
        "embeddings": In("embed"),
        # the serving event log: its meta.json (if any) does not change as events are appended
        "events": In(by_listing=True),
        "resume": In(),
        "out": Out(),
    }


def run(args: argparse.Namespace) -> int:
    from llmrec.data.tables import read_items
    from llmrec.eval.evaluate import load_item_space
    from llmrec.raysetup import init_ray
    from llmrec.schema import INTERACTIONS_FILE
    from llmrec.scorer.train import fit_scorer

    if args.val_users < -1:
        raise ValueError(f"--val-users must be >= 0, or -1 for every user with >= 2 events; got {args.val_users}")
    val_users = None if args.val_users == -1 else args.val_users
    # titles, facets (synthesised text feedback) and the encoder of the item vectors come with the item space
    items, embed_meta = load_item_space(args.embeddings, read_items(args.data))
    init_ray(address=args.address)
    import ray.data

    from llmrec.scorer.dataset import source_dataset

    source = source_dataset(str(Path(args.data) / INTERACTIONS_FILE))
    if args.events:
        from llmrec.state.event_log import read_events

        extra = read_events(args.events)  # the serving log is read here, then handed to Ray Data
        source = source.union(ray.data.from_pandas(extra)) if len(extra) else source
        logger.info("added %d events from the serving log %s", len(extra), args.events)
    meta = fit_scorer(
        source,
        items,
        args.out,
        num_workers=args.num_workers,
        use_gpu=args.use_gpu,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        resume_from=args.resume,
        patience=args.patience,
        embed_meta=embed_meta,
        checkpoint_dir=args.checkpoint_dir,
        max_failures=args.max_failures,
        dim=args.dim,
        max_len=args.max_len,
        n_neg=args.n_neg,
        val_users=val_users,
        cooc_neighbors=args.cooc_neighbors,
    )
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
        + f"{meta['wall_s']:.1f}s"
    )
    return 0
