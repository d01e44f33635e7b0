"""`llmrec prepare`: a raw dataset folder -> canonical `items.parquet`, `interactions.parquet`, `meta.json`.

Flow: adapter (`llmrec.data.adapters.<name>.load`) parses and builds item text -> `validate_catalog` ->
`validate_interactions` against the kept item ids -> write tables (+ `rejects.parquet` when any row was
rejected) -> `meta.json` (stage "prepare").

meta.json fields: `dataset, source, n_items, n_users, n_interactions, n_rejected` (all rejected rows),
`n_rejected_items, n_rejected_interactions, rejected_reasons` ({reason: count}), `fingerprint`
(sha256 of the source files read), `files` (their names), `ts_is_order` (True when `ts` is a sequence
position, not unix time), `facets` (`{"n_items_with_facets", "n_distinct", "source"}` over the kept items;
`source` says where the labels came from, None when the dataset has none), `wall_s`, plus adapter notes.
When the item text includes user-written text (MovieLens tags, Amazon reviews), `text_events.parquet` holds it
(one row per text: user_id, item_id, ts, text; see llmrec.data.item_text), items get `text_base`, and meta
has `text_events` (how texts are joined, `n_events`, `n_dropped` on rejected items).

Every prepared items.parquet has the `facets` column (schema.FACETS, list<string>; see llmrec.data.facets).

Example::

    from llmrec.data.prepare import prepare
    meta = prepare("movielens-latest-small", "/data/movielens-latest-small", "runs/ml/data")

Tests: tests/test_prepare.py.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import pandas as pd

from llmrec.artifacts import file_fingerprint, write_meta
from llmrec.data.adapters.registry import DATASETS, get_adapter
from llmrec.data.catalog import validate_catalog, validate_interactions
from llmrec.data.facets import facet_stats
from llmrec.data.tables import write_interactions, write_items, write_rejects
from llmrec.schema import FACETS, ITEM_ID, TEXT, USER_ID

logger = logging.getLogger(__name__)

__all__ = ["DATASETS", "GENERIC_OPTS", "prepare"]  # DATASETS: from llmrec.data.adapters.registry

GENERIC_OPTS = (
    "items",
    "id_col",
    "text_cols",
    "interactions",
    "user_col",
    "item_col",
    "ts_col",
    "rating_col",
    "event_col",
    "default_event",
    "facet_cols",
)


def prepare(
    dataset: str,
    source: str | os.PathLike | None,
    out: str | os.PathLike,
    *,
    skip_bad_rows: bool = False,
    **opts: Any,
) -> dict[str, Any]:
    """Convert one raw dataset into canonical tables in `out`.

    Args:
        dataset: one of DATASETS (an adapter NAME, `llmrec.data.adapters.registry`).
        source: the raw dataset folder (for "generic": the folder relative file names are resolved in; may
            be None when the files are given as absolute paths).
        out: output folder (created); gets items.parquet, interactions.parquet, meta.json and, when rows were
            rejected, rejects.parquet.
        skip_bad_rows: write rows that fail validation to rejects.parquet instead of raising.
        **opts: only for "generic": items, id_col, text_cols, interactions, user_col, item_col, ts_col,
            rating_col, event_col, default_event, facet_cols (see llmrec.data.adapters.generic).

    Returns:
        The meta dict written to `out/meta.json`.

    Raises:
        ValueError: unknown dataset or option, bad rows without skip_bad_rows. FileNotFoundError: source
            files missing.
    """
    t0 = time.perf_counter()
    adapter = get_adapter(dataset)  # ValueError listing the DATASETS names
    opts = {k: v for k, v in opts.items() if v is not None}
    allowed = GENERIC_OPTS if dataset == "generic" else ()
    unknown = sorted(set(opts) - set(allowed))
    if unknown:
        raise ValueError(
            f"dataset {dataset!r} takes no option(s) {unknown}"
            + (
                f"; valid options are {list(allowed)}"
                if allowed
                else "; those options are for --dataset generic"
            )
        )
    if source is None and dataset != "generic":
        raise ValueError(f"dataset {dataset!r} needs --source DIR (the folder with its raw files)")
    src = Path(source) if source is not None else None
    loaded = adapter.load(src, **opts)

    if dataset == "generic":
        id_col, text_cols = loaded.notes["id_col"], loaded.notes["text_cols"]
    else:
        id_col, text_cols = ITEM_ID, [TEXT]
    items, item_rejects = validate_catalog(loaded.items, id_col, text_cols, skip_bad_rows=skip_bad_rows)
    if FACETS not in items.columns:  # a catalog without labels: the column still exists, all []
        items[FACETS] = pd.Series([[] for _ in range(len(items))], index=items.index, dtype="object")
    interactions, inter_rejects = validate_interactions(
        loaded.interactions, items[ITEM_ID], skip_bad_rows=skip_bad_rows
    )
    parts = [r for r in (loaded.rejects, item_rejects, inter_rejects) if len(r)]
    rejects = pd.concat(parts, ignore_index=True) if parts else loaded.rejects.iloc[:0]

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_items(items, out_dir)
    write_interactions(interactions, out_dir)
    write_rejects(rejects, out_dir)
    text_meta = _write_text_events(loaded, items, out_dir)

    reasons = rejects["reason"].value_counts().sort_index()
    meta_fields: dict[str, Any] = {
        "dataset": dataset,
        "source": str(src.resolve()) if src is not None else None,
        "n_items": int(len(items)),
        "n_users": int(interactions[USER_ID].nunique()),
        "n_interactions": int(len(interactions)),
        "n_rejected": int(len(rejects)),
        "n_rejected_items": int((rejects["table"] == "items").sum()),
        "n_rejected_interactions": int((rejects["table"] == "interactions").sum()),
        "rejected_reasons": {str(k): int(v) for k, v in reasons.items()},
        "fingerprint": file_fingerprint(loaded.files),
        "files": [p.name for p in loaded.files],
        "ts_is_order": bool(loaded.notes.pop("ts_is_order", False)),
        "facets": facet_stats(items[FACETS].tolist(), loaded.facet_source),
        "text_events": text_meta,
        **{k: v for k, v in loaded.notes.items() if k not in ("id_col", "text_cols")},
    }
    meta_fields["wall_s"] = round(time.perf_counter() - t0, 3)
    meta = write_meta(out_dir, "prepare", **meta_fields)
    logger.info(
        "prepared %s: %d items (%d with facets, %d distinct), %d users, %d interactions, %d rejected -> %s "
        "in %.1fs",
        dataset,
        meta["n_items"],
        meta["facets"]["n_items_with_facets"],
        meta["facets"]["n_distinct"],
        meta["n_users"],
        meta["n_interactions"],
        meta["n_rejected"],
        out_dir,
        meta["wall_s"],
    )
    return meta


def _write_text_events(loaded: Any, items: pd.DataFrame, out_dir: Path) -> dict[str, Any] | None:
    """Write text_events.parquet for the kept items (or remove a stale one); its meta.json entry or None."""
    from llmrec.data.item_text import base_texts, build_item_texts, write_text_events
    from llmrec.schema import TEXT_EVENTS_FILE

    if loaded.text_events is None:
        (out_dir / TEXT_EVENTS_FILE).unlink(missing_ok=True)
        return None
    ev = loaded.text_events
    kept = ev[ITEM_ID].astype(str).isin(set(items[ITEM_ID].astype(str))).to_numpy()
    n_dropped = int((~kept).sum())
    if n_dropped:
        logger.info("text events: %d of %d are on rejected items and are not kept", n_dropped, len(ev))
    ev = ev[kept]
    # the served text must be what evaluation rebuilds from all events: check it once here
    rebuilt = build_item_texts(base_texts(items), ev, loaded.text_spec)
    served = pd.Series(items[TEXT].astype(str).to_numpy(), index=items[ITEM_ID].astype(str))
    bad = served.index[(rebuilt != served).to_numpy()]
    if len(bad):
        raise AssertionError(f"item text differs from build_item_texts(text_base, text events) for "
                             f"{len(bad)} items, e.g. {list(bad[:3])}: the adapter must build text with "
                             f"that function")
    write_text_events(ev, out_dir)
    return {**loaded.text_spec.to_meta(), "n_events": int(len(ev)), "n_dropped": n_dropped,
            "n_items": int(ev[ITEM_ID].nunique())}
