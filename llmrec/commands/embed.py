"""`llmrec embed`: item texts -> embeddings artifact (Ray Data + BERT encoder actors)."""

from __future__ import annotations

import argparse
import logging

from llmrec.storage import Arg, In, Out

logger = logging.getLogger(__name__)

HELP = "embed every item's text with a BERT encoder on Ray Data (writes embeddings.parquet + meta.json)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--items", required=True, help="items.parquet, or the folder written by `llmrec prepare`")
    p.add_argument("--out", required=True, help="output folder (embeddings.parquet, meta.json)")
    p.add_argument(
        "--model", default=None, help="local HF model folder or hub name (default: packaged all-MiniLM-L6-v2)"
    )
    p.add_argument("--batch-size", type=int, default=128, help="rows per encoder forward pass (default 128)")
    p.add_argument("--max-length", type=int, default=128, help="token limit per text (default 128)")
    p.add_argument(
        "--num-actors",
        type=int,
        default=None,
        help="encoder actors (default: one per GPU, else sized to the CPUs leaving one for reads)",
    )
    p.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="auto: GPU actors when the Ray cluster has GPUs (default auto)",
    )
    p.add_argument(
        "--bucketing",
        default="dataset",
        choices=["dataset", "group"],
        help="length bucketing: sort all rows by token count (dataset, default) or within each "
        "actor call (group: no sort stage)",
    )
    p.add_argument(
        "--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or a local Ray)"
    )


def storage_args(args: argparse.Namespace) -> dict[str, Arg]:
    """Flags that may be URIs (llmrec.cli stages them); --model only when it is a URI, not a hub name."""
    return {"items": In("prepare"), "model": In(), "out": Out()}


def run(args: argparse.Namespace) -> int:
    from llmrec.embed.ray_embed import embed_catalog

    meta = embed_catalog(
        args.items,
        args.out,
        model=args.model,
        batch_size=args.batch_size,
        max_length=args.max_length,
        num_actors=args.num_actors,
        device=args.device,
        ray_address=args.address,
        bucketing=args.bucketing,
    )
    print(
        f"wrote {meta['n_items']} x {meta['dim']} embeddings ({meta['model_name']}) to {args.out} "
        f"in {meta['wall_s']:.1f}s: {meta['items_per_s']:.0f} items/s on {meta['num_actors']} "
        f"{meta['device']} actor(s)"
    )
    return 0
