"""`llmrec index`: embeddings artifact -> item index artifact (FAISS flat / HNSW / IVF / any index_factory
string, or exact torch)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import typing
from typing import Any

from llmrec.config import IndexConfig, add_config_arguments, config_from_args, with_overrides
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
    # every index option (--kind, --check, --sample, --device, ...) is a field of IndexConfig: one flag per
    # field, with the field's default and help (llmrec/config.py); the kind parameters are fields too, set by
    # --param KEY=VALUE
    add_config_arguments(p, IndexConfig)
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="index parameter, repeatable: "
        + "; ".join(f"{name} ({text})" for name, text in _param_fields().items()),
    )
    p.add_argument(
        "--add-embeddings",
        default=None,
        metavar="DIR",
        help="add the items of this embeddings artifact to the existing index in --out, in place",
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
        meta = add_to_index(args.out, args.add_embeddings, index_config(args))
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
    meta = build_index(args.embeddings, args.out, index_config(args))
    rec = f", recall@10 {meta['recall_at_10']:.4f} vs exact" if "recall_at_10" in meta else ""
    print(
        f"indexed {meta['n_items']} x {meta['dim']} items ({meta['embed'].get('model_name')}) as a "
        f"{meta['kind']} index ({meta['index_bytes'] / 2**20:.1f} MiB) in {args.out} in "
        f"{meta['build_s']:.1f}s{rec}"
    )
    return 0


def index_config(args: argparse.Namespace) -> IndexConfig:
    """The IndexConfig of the parsed flags, the `--param KEY=VALUE` kind parameters included.

    Raises:
        ValueError: a --param that is not KEY=VALUE, an unknown key, or a value of the wrong type / range.
    """
    return with_overrides(config_from_args(IndexConfig, args), _parse_params(args.param), "--param")


def _param_fields() -> dict[str, str]:
    """{kind parameter: its help}: the IndexConfig fields without a flag of their own."""
    return {f.name: f.metadata["help"] for f in dataclasses.fields(IndexConfig) if not f.metadata["cli"]}


def _parse_params(items: list[str]) -> dict[str, Any]:
    hints = typing.get_type_hints(IndexConfig)
    out: dict[str, Any] = {}
    for item in items:
        key, sep, val = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--param expects KEY=VALUE, got {item!r}")
        if key not in _param_fields():
            raise ValueError(f"--param {key}: unknown index parameter; valid: {sorted(_param_fields())}")
        cast = int if hints[key] == (int | None) else float
        try:
            out[key] = cast(val)
        except ValueError:
            raise ValueError(
                f"--param {key}: value must be {'an integer' if cast is int else 'a number'}, got {val!r}"
            ) from None
    return out
