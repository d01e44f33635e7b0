"""`llmrec prepare`: convert a raw dataset folder into canonical items/interactions tables.

Examples::

    llmrec prepare --dataset movielens-latest-small \\
        --source ../shared/data/movielens-latest-small --out runs/ml/data
    llmrec prepare --dataset generic --source my_data --out runs/mine/data \\
        --items catalog.csv --id-col sku --text-cols title,description --facet-cols genre,section \\
        --interactions events.jsonl --ts-col time
"""

from __future__ import annotations

import argparse
import json

from llmrec.storage import Arg, In, Out

HELP = (
    "convert a raw dataset (movielens, amazon, mind or any parquet/CSV/JSONL catalog) into canonical tables"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from llmrec.data.prepare import DATASETS  # light: no torch/ray

    p.add_argument("--dataset", required=True, choices=DATASETS, help="dataset adapter")
    p.add_argument(
        "--source", default=None, help="folder with the raw files (generic: base of relative paths)"
    )
    p.add_argument(
        "--out", required=True, help="output folder: items.parquet, interactions.parquet, meta.json"
    )
    p.add_argument(
        "--skip-bad-rows",
        action="store_true",
        help="write rows that fail validation to rejects.parquet instead of stopping",
    )
    g = p.add_argument_group("generic dataset")
    g.add_argument(
        "--items", default=None, help="catalog file (.parquet, .csv, .tsv, .jsonl; optionally .gz)"
    )
    g.add_argument("--id-col", default=None, help="item id column (default item_id)")
    g.add_argument(
        "--text-cols", default=None, help="comma list of text columns joined into text (default text)"
    )
    g.add_argument(
        "--facet-cols",
        default=None,
        help="comma list of label columns for the facets column: list values as is, strings split on | "
        "and ; (default: a column named facets, else none)",
    )
    g.add_argument("--interactions", default=None, help="interactions file (optional)")
    g.add_argument("--user-col", default=None, help="user id column (default user_id)")
    g.add_argument("--item-col", default=None, help="item id column in interactions (default item_id)")
    g.add_argument(
        "--ts-col",
        default=None,
        help="time column: unix s, datetime or date string (default ts; absent -> row order)",
    )
    g.add_argument("--rating-col", default=None, help="rating column (default rating; absent -> null)")
    g.add_argument("--event-col", default=None, help="event column (default event; absent -> rating/view)")
    g.add_argument(
        "--default-event", default=None, help="event for rows without event and rating (default view)"
    )


def storage_args(args: argparse.Namespace) -> dict[str, Arg]:
    """Flags that may be URIs (llmrec.cli stages them): the raw folder and files in, the data folder out."""
    return {"source": In(), "items": In(), "interactions": In(), "out": Out()}


def run(args: argparse.Namespace) -> int:
    from llmrec.data.prepare import GENERIC_OPTS, prepare

    opts = {k: getattr(args, k) for k in GENERIC_OPTS}
    meta = prepare(args.dataset, args.source, args.out, skip_bad_rows=args.skip_bad_rows, **opts)
    keys = (
        "dataset",
        "n_items",
        "n_users",
        "n_interactions",
        "n_rejected",
        "rejected_reasons",
        "facets",
        "fingerprint",
    )
    print(json.dumps({k: meta.get(k) for k in keys}, sort_keys=False))
    return 0
