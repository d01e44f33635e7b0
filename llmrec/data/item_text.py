"""Item text that includes what users wrote (MovieLens tags, Amazon reviews), rebuildable from any subset.

Some catalogs' text is partly user-generated: a MovieLens movie's text lists its users' tags, an Amazon
5-core item (no metadata) is described only by its reviews. Such text holds later behaviour: a test user's own
tags or review of the very item it is tested on. So prepare keeps the user-written part apart:

- `items.parquet` column `text_base` (schema.TEXT_BASE): the text without it (MovieLens "<title>. Genres:
  ...", Amazon a fixed "<category> product" line); `text` is the served text, built from every text event.
- `text_events.parquet` (schema.TEXT_EVENTS_FILE): one row per written text, `user_id, item_id, ts, text`, in
  the order the item text lists them.
- prepare's meta.json `text_events`: the `TextSpec` fields (how the texts are joined) plus counts.

`build_item_texts(base, events, spec)` makes the item texts from any subset of the events; with all of them it
gives exactly `items.text` (a test checks this on MovieLens). Evaluation keeps only the events that existed
before each split's cutoff (`llmrec.eval.split.visible_text_events`) and re-embeds the items whose text
changed (`llmrec.eval.evaluate`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from llmrec.data.catalog import join_text
from llmrec.schema import ITEM_ID, META_FILE, TEXT, TEXT_BASE, TEXT_EVENTS_FILE, TS, USER_ID

logger = logging.getLogger(__name__)

__all__ = ["TextSpec", "base_texts", "build_item_texts", "read_text_events", "write_text_events"]

EVENT_COLUMNS = (USER_ID, ITEM_ID, TS, TEXT)


@dataclass(frozen=True)
class TextSpec:
    """How an item's text events are appended to its base text: `base. <label>: t1<sep>t2...`."""

    label: str  # "Tags", "Reviews"
    sep: str = ", "  # between texts
    distinct: bool = False  # keep only the first of texts equal up to case (tags)
    event_chars: int | None = None  # cut each text to this many characters (long reviews)
    max_chars: int | None = None  # cut the joined user-written part to this many characters
    source: str = ""  # where the texts come from, for meta.json

    def to_meta(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> TextSpec:
        return cls(**{k: meta[k] for k in cls.__dataclass_fields__ if k in meta})


def build_item_texts(base: pd.Series, events: pd.DataFrame, spec: TextSpec) -> pd.Series:
    """Item texts: each item's base text plus its events' texts (in the events' row order).

    Args:
        base: str Series indexed by item_id (the `text_base` column).
        events: rows of `text_events.parquet` (any subset, row order kept); events on items not in `base`
            are ignored.
        spec: how texts are joined.

    Returns:
        str Series indexed like `base`.
    """
    parts: dict[str, list[str]] = {}
    seen: dict[str, set[str]] = {}
    for item, text in zip(
        events[ITEM_ID].astype(str).tolist(), events[TEXT].astype(str).tolist(), strict=True
    ):
        t = text.strip()
        if spec.event_chars is not None and len(t) > spec.event_chars:
            t = t[: spec.event_chars].rstrip()
        if not t:
            continue
        if spec.distinct:
            key = t.lower()
            if key in seen.setdefault(item, set()):
                continue
            seen[item].add(key)
        parts.setdefault(item, []).append(t)
    out = []
    for item, b in zip(base.index.astype(str), base.astype(str).tolist(), strict=True):
        texts = parts.get(item)
        if not texts:
            out.append(b)
            continue
        joined = spec.sep.join(texts)
        if spec.max_chars is not None and len(joined) > spec.max_chars:
            joined = joined[: spec.max_chars].rstrip()
        out.append(join_text([b, f"{spec.label}: {joined}"]))
    return pd.Series(out, index=base.index, dtype=object)


def write_text_events(events: pd.DataFrame, out_dir: str | os.PathLike) -> Path:
    """Write `out_dir/text_events.parquet` (user_id, item_id, ts int64, text; row order kept)."""
    df = events[list(EVENT_COLUMNS)].copy()
    df[[USER_ID, ITEM_ID, TEXT]] = df[[USER_ID, ITEM_ID, TEXT]].astype(str)
    df[TS] = df[TS].astype("int64")
    path = Path(out_dir) / TEXT_EVENTS_FILE
    df.to_parquet(path, index=False)
    return path


def read_text_events(data_dir: str | os.PathLike) -> tuple[pd.DataFrame, TextSpec] | None:
    """(events, spec) of a prepare folder whose item text includes user-written text, else None.

    Raises:
        ValueError: meta.json names text events but the file or the items' `text_base` column is missing.
    """
    import json

    d = Path(data_dir)
    meta_path = d / META_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    spec_meta = meta.get("text_events")
    if not spec_meta:
        return None
    path = d / TEXT_EVENTS_FILE
    if not path.is_file():
        raise ValueError(
            f"{meta_path} says the item text includes user-written text but {path} is missing; "
            f"re-run `llmrec prepare`"
        )
    events = pd.read_parquet(path)
    missing = [c for c in EVENT_COLUMNS if c not in events.columns]
    if missing:
        raise ValueError(
            f"{path} lacks columns {missing}; expected {list(EVENT_COLUMNS)}; re-run `llmrec prepare`"
        )
    return events, TextSpec.from_meta(spec_meta)


def base_texts(items: pd.DataFrame) -> pd.Series:
    """str Series indexed by item_id: `text_base` (the text without user-written parts)."""
    if TEXT_BASE not in items.columns:
        raise ValueError(
            f"items lack the {TEXT_BASE!r} column that text events need (got {list(items.columns)}); "
            f"re-run `llmrec prepare`"
        )
    return pd.Series(items[TEXT_BASE].astype(str).to_numpy(), index=items[ITEM_ID].astype(str), dtype=object)
