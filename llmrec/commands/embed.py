"""`llmrec embed`: item texts -> embeddings artifact (Ray Data + BERT encoder actors), storage to storage.

`--items` and `--out` URIs (s3://, gs://, file://, ...) are read and written by the Ray workers themselves,
not staged through the driver's disk; only process-local fsspec URIs (memory://) are staged.
"""

from __future__ import annotations

import argparse
import logging

from llmrec import storage
from llmrec.storage import Arg, In, Out

logger = logging.getLogger(__name__)

HELP = "embed every item's text with a BERT encoder on Ray Data (writes part-*.parquet shards + meta.json)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--items",
        required=True,
        help="items parquet file, a folder of parquet shards, or the folder written by `llmrec prepare`",
    )
    p.add_argument("--out", required=True, help="output folder (part-*.parquet shards, meta.json)")
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
        help="auto: GPU actors when the Ray cluster has GPUs or its autoscaler can start GPU nodes; cuda: "
        "request GPU actors (default auto)",
    )
    p.add_argument(
        "--num-gpus",
        type=int,
        default=None,
        help="request N encoder actors of 1 GPU each, even when no GPU node is up yet (an autoscaler "
        "starts them)",
    )
    p.add_argument(
        "--bucketing",
        default="group",
        choices=["group", "dataset"],
        help="length bucketing within each block of rows (group, default; dataset: its old name, which "
        "sorted the whole catalog)",
    )
    p.add_argument(
        "--rows-per-block",
        type=int,
        default=None,
        help="rows per block: the unit of tokenizing, length bucketing, encoding and one output file "
        "(default: ~2 blocks per actor, 8 batches to 8,192 rows)",
    )
    p.add_argument(
        "--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or a local Ray)"
    )


def storage_args(args: argparse.Namespace) -> dict[str, Arg]:
    """Flags llmrec.cli stages when they are URIs: --model, and --items / --out only for URIs other processes
    cannot open (memory://); every other URI goes to the Ray workers as it is."""
    spec: dict[str, Arg] = {"model": In()}
    for name, arg in (("items", In("prepare")), ("out", Out())):
        if not storage.shared_across_processes(getattr(args, name, None)):
            spec[name] = arg
    return spec


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
        num_gpus=args.num_gpus,
        rows_per_block=args.rows_per_block,
    )
    print(
        f"wrote {meta['n_items']} x {meta['dim']} embeddings ({meta['model_name']}) to {args.out} "
        f"in {meta['wall_s']:.1f}s: {meta['items_per_s']:.0f} items/s on {meta['num_actors']} "
        f"{meta['device']} actor(s), {meta['n_parts']} part files"
    )
    return 0
