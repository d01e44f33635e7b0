"""`llmrec index`: embeddings artifact -> item index artifact (FAISS flat / HNSW / IVF / any index_factory
string, or exact torch)."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from llmrec.storage import Arg, In, Out

logger = logging.getLogger(__name__)

HELP = (
    "build a top-k item index (faiss flat/hnsw/ivf/factory string, or torch) over an embeddings artifact, "
    "or add items to one"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--embeddings", default=None, help="folder written by `llmrec embed` to build the index from"
    )
    p.add_argument(
        "--out", required=True, help="index folder (index.faiss | index.npy, item_ids.npy, meta.json)"
    )
    p.add_argument(
        "--kind",
        "--index-kind",
        dest="kind",
        default="auto",
        metavar="KIND",
        help="auto | flat | hnsw | ivf | torch, or a FAISS index_factory string such as IVF4096,SQ8, "
        "IVF4096,PQ48, HNSW32,SQ8 (inner product). auto: exact flat below 50k items, HNSW below 1M, "
        "IVF{~4 sqrt N},SQ8 from 1M; on a GPU below 1M faiss GPU flat or torch (default auto)",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="also measure recall@10 for the exact kinds (flat, torch); approximate kinds always measure "
        "it against exact search on --sample catalog items (stored in meta.json)",
    )
    p.add_argument(
        "--sample", type=int, default=1000, help="catalog items used as recall queries (default 1000)"
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:i (default auto)")
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="index parameter, repeatable: hnsw M, ef_construction, ef_search, target_recall; "
        "ivf nlist, nprobe, target_recall, train_size; factory strings nprobe or ef_search, "
        "target_recall, train_size; torch chunk_elems",
    )
    p.add_argument(
        "--add-embeddings",
        default=None,
        metavar="DIR",
        help="add the items of this embeddings artifact to the existing index in --out, in place",
    )
    p.add_argument(
        "--skip-existing",
        action="store_true",
        help="with --add-embeddings: leave out items already indexed instead of refusing",
    )


def storage_args(args: argparse.Namespace) -> dict[str, Arg]:
    """Flags that may be URIs (llmrec.cli stages them); --add-embeddings updates the index in --out."""
    out = Out("update") if args.add_embeddings else Out()
    return {"embeddings": In("embed"), "add_embeddings": In("embed"), "out": out}


def run(args: argparse.Namespace) -> int:
    from llmrec.index.build import add_to_index, build_index

    if args.add_embeddings:
        if args.embeddings:
            raise ValueError(
                "pass either --embeddings (build a new index) or --add-embeddings (add to the index "
                "in --out), not both"
            )
        meta = add_to_index(
            args.out, args.add_embeddings, skip_existing=args.skip_existing, device=args.device
        )
        last = meta["added"][-1]
        print(
            f"added {last['n_added']} items (skipped {last['n_skipped']}) to the {meta['kind']} index in "
            f"{args.out}: now {meta['n_items']} items"
        )
        return 0
    if not args.embeddings:
        raise ValueError(
            "--embeddings DIR is required (the folder written by `llmrec embed`), "
            "or --add-embeddings DIR to add to an existing index"
        )
    meta = build_index(
        args.embeddings,
        args.out,
        kind=args.kind,
        check=args.check,
        sample=args.sample,
        device=args.device,
        **_parse_params(args.param),
    )
    rec = f", recall@10 {meta['recall_at_10']:.4f} vs exact" if "recall_at_10" in meta else ""
    print(
        f"indexed {meta['n_items']} x {meta['dim']} items ({meta['embed'].get('model_name')}) as a "
        f"{meta['kind']} index ({meta['index_bytes'] / 2**20:.1f} MiB) in {args.out} in "
        f"{meta['build_s']:.1f}s{rec}"
    )
    return 0


def _parse_params(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, val = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--param expects KEY=VALUE, got {item!r}")
        for cast in (int, float):
            try:
                out[key] = cast(val)
                break
            except ValueError:
                continue
        else:
            raise ValueError(f"--param {key}: value must be a number, got {val!r}")
    return out
