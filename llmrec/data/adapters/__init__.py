"""Dataset adapters: each turns one raw dataset folder into canonical-column frames.

Every adapter module defines `NAME: str` (its `llmrec prepare --dataset` name) and
`load(source: Path, **opts) -> Loaded`, and is listed once in `llmrec.data.adapters.registry.ADAPTER_MODULES`,
which is where `--dataset` names come from (docs/howto.md adds one). Adapters only
parse, build text and build the `facets` column (schema.FACETS: a list of labels per item, from what the
dataset really has; see llmrec.data.facets); `llmrec.data.prepare` validates (llmrec.data.catalog) and
writes the tables. Rows that an adapter knowingly cannot use (an item without text, a click on news
without a text row) go to `Loaded.rejects` with a reason, never silently away.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from llmrec.data.catalog import empty_rejects
from llmrec.data.item_text import TextSpec


@dataclass
class Loaded:
    """What an adapter read: canonical-column frames plus the source files it used (for the fingerprint)."""

    items: pd.DataFrame  # item_id, text, original fields, facets (list[str] per item)
    interactions: pd.DataFrame  # user_id, item_id, ts, rating, event
    files: list[Path]  # source files read, in a fixed order
    rejects: pd.DataFrame = field(default_factory=empty_rejects)  # catalog.REJECT_COLUMNS
    notes: dict[str, object] = field(default_factory=dict)  # extra meta.json fields
    facet_source: str | None = None  # where `facets` came from (meta.json facets.source); None: no facets
    # user-written item text (llmrec.data.item_text): user_id, item_id, ts, text rows, and how they are
    # joined; items then carry `text_base`, and `text` = build_item_texts(text_base, text_events, text_spec)
    text_events: pd.DataFrame | None = None
    text_spec: TextSpec | None = None


def require_files(source: Path, names: list[str], dataset: str, homepage: str | None = None) -> list[Path]:
    """The paths `source/name`, or a FileNotFoundError naming the missing ones, where they were looked for
    (absolute), what folder to pass and where the dataset comes from (`homepage`, its official page)."""
    source = Path(source)
    origin = f"; the {dataset} dataset comes from {homepage}" if homepage else ""
    if not source.is_dir():
        raise FileNotFoundError(
            f"--source {source} is not a folder (looked for {source.expanduser().absolute()}); pass the "
            f"{dataset} dataset folder, the one holding {names}{origin}"
        )
    paths = [source / n for n in names]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{source} is missing {missing} for dataset {dataset!r} (looked in "
            f"{source.expanduser().absolute()}); pass the folder that holds {names}{origin}"
        )
    return paths
