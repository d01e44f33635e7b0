"""`llmrec embed`: item texts -> embeddings artifact (Ray Data + BERT encoder actors), storage to storage.

`--items` and `--out` URIs (s3://, gs://, file://, ...) are read and written by the Ray workers themselves,
not staged through the driver's disk; only process-local fsspec URIs (memory://) are staged.
"""

from __future__ import annotations

import argparse
import logging

from llmrec import storage
from llmrec.config import EmbedConfig, add_config_arguments, config_from_args
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
    # every embedding option (--model, --batch-size, --max-length, --device, ...) is a field of EmbedConfig:
    # one flag per field, with the field's default and help (llmrec/config.py)
    add_config_arguments(p, EmbedConfig)
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

    meta = embed_catalog(args.items, args.out, config_from_args(EmbedConfig, args), ray_address=args.address)
    print(
        f"wrote {meta['n_items']} x {meta['dim']} embeddings ({meta['model_name']}) to {args.out} "
        f"in {meta['wall_s']:.1f}s: {meta['items_per_s']:.0f} items/s on {meta['num_actors']} "
        f"{meta['device']} actor(s), {meta['n_parts']} part files"
    )
    return 0
