"""Interactions as model input: catalog rows of the items (`attach_item_idx`) and per-user `History` objects
(`make_histories`, in the one event order of `llmrec.data.order.sort_events`).

Example::

    inter = attach_item_idx(interactions, space, unknown="drop")  # events on unknown items: counted, logged
    hists = make_histories(inter, ["u1", "u2"], seed=0)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd

from llmrec.data.order import sort_events
from llmrec.protocol import History, ItemSpace
from llmrec.schema import EVENT, EVENT_KINDS, ITEM_ID, ITEM_IDX, RATING, TS, USER_ID

logger = logging.getLogger(__name__)

__all__ = ["UNKNOWN_ITEMS", "attach_item_idx", "item_lookup", "make_histories"]

UNKNOWN_ITEMS = ("raise", "drop")  # what attach_item_idx does with events on items outside the space


def item_lookup(item_ids: np.ndarray | Sequence[str]) -> pd.Index:
    """The str item ids as a `pd.Index` (position = catalog row), for `attach_item_idx` over many batches."""
    index = pd.Index(np.asarray(item_ids).astype(str))
    if not index.is_unique:
        dup = index[index.duplicated()].unique()[:5].tolist()
        raise ValueError(f"item ids must be unique, got duplicates e.g. {dup}; re-run `llmrec embed`")
    return index


def attach_item_idx(
    df: pd.DataFrame,
    items: ItemSpace | pd.Index,
    unknown: Literal["raise", "drop"] = "raise",
) -> pd.DataFrame:
    """Interactions with an int64 `item_idx` column (schema.ITEM_IDX): the row of each item in `items`.

    Args:
        df: interactions with at least user_id, item_id, ts; a missing `rating` column is added as NaN and a
            missing `event` column as "view"; an `item_idx` already there is kept (range-checked).
        items: the item space, or `item_lookup(item_ids)` built once for many batches.
        unknown: events on items outside the space: "raise" a ValueError naming them (training data must
            match its embeddings), or "drop" them, logging how many (evaluation of a catalog that lost
            items); a frame with nothing left raises either way.

    Returns:
        A new frame: the same rows in the same order ("drop": the kept ones, with a fresh RangeIndex).
    """
    if unknown not in UNKNOWN_ITEMS:
        raise ValueError(f"unknown must be one of {list(UNKNOWN_ITEMS)}, got {unknown!r}")
    missing_cols = [c for c in (USER_ID, ITEM_ID, TS) if c not in df.columns]
    if missing_cols:
        raise ValueError(
            f"interactions lack columns {missing_cols}; "
            f"expected {USER_ID}, {ITEM_ID}, {TS}, {RATING}, {EVENT} "
            f"(the canonical table written by `llmrec prepare`), got {list(df.columns)}"
        )
    out = df.copy()
    if RATING not in out.columns:
        out[RATING] = np.nan
    if EVENT not in out.columns:
        out[EVENT] = "view"
    bad_events = sorted(set(out[EVENT].astype(str).unique()) - set(EVENT_KINDS))
    if bad_events:
        raise ValueError(f"unknown event kinds {bad_events[:10]}; expected one of {list(EVENT_KINDS)}")
    n_items = len(items) if isinstance(items, pd.Index) else items.n_items
    if ITEM_IDX in out.columns:
        idx = out[ITEM_IDX].to_numpy(dtype=np.int64)
        if len(idx) and (idx.min() < 0 or idx.max() >= n_items):
            raise ValueError(f"item_idx must lie in [0, {n_items}), got [{idx.min()}, {idx.max()}]")
        out[ITEM_IDX] = idx
        return out
    index = items if isinstance(items, pd.Index) else item_lookup(items.item_ids)
    idx = index.get_indexer(out[ITEM_ID].astype(str).to_numpy())  # (n,) -1 = not in the space
    miss = idx < 0
    n_miss = int(miss.sum())
    if n_miss and unknown == "raise":
        bad = out.loc[miss, ITEM_ID].astype(str).unique()
        raise ValueError(
            f"{len(bad)} item ids in the interactions are not in the item space (embeddings), e.g. "
            f"{list(bad[:5])}; re-run `llmrec embed` on the same prepared data"
        )
    if n_miss:
        bad = out.loc[miss, ITEM_ID].astype(str)
        logger.warning(
            "dropping %d of %d interactions on %d item(s) without an embedding (e.g. %s)",
            n_miss,
            len(out),
            bad.nunique(),
            sorted(set(bad.head(5))),
        )
    if n_miss == len(out) and unknown == "drop":
        raise ValueError(
            f"no interaction refers to an item of the embeddings ({len(out)} interactions given); "
            "were they built from this data? Re-run `llmrec embed` on it"
        )
    if unknown == "drop":
        out = out.loc[~miss].reset_index(drop=True)
        idx = idx[~miss]
    out[ITEM_IDX] = idx.astype(np.int64)
    return out


def make_histories(
    events: pd.DataFrame,
    user_ids: Sequence[str] | None = None,
    seed: int = 0,
    max_len: int | None = None,
) -> list[History]:
    """One time-ordered `History` per user (empty when the user has no events).

    Args:
        events: interactions with `item_idx` (schema.ITEM_IDX); ordered by `llmrec.data.order.sort_events(
            events, seed)` (ts, then seeded random ties), the order of the splits and of training.
        user_ids: the users, in the order wanted; None = every user of `events`, sorted by id.
        max_len: keep each user's last max_len events (None = all).

    Returns:
        len(user_ids) histories: item_idx int64 (L,), ts int64 (L,), event object (L,), rating float64 (L,)
        (NaN where none), oldest first.
    """
    if max_len is not None and max_len < 1:
        raise ValueError(f"max_len must be >= 1 or None, got {max_len}")
    df = sort_events(events, seed)
    u = df[USER_ID].astype(str).to_numpy()
    starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]]) if len(u) else np.zeros(0, dtype=np.int64)
    ends = np.r_[starts[1:], len(u)] if len(u) else starts  # (U,) each user's rows: [start, end)
    span = {u[s]: (s, e) for s, e in zip(starts, ends, strict=True)}
    idx = df[ITEM_IDX].to_numpy(np.int64)
    ts = df[TS].to_numpy(np.int64)
    ev = df[EVENT].to_numpy(dtype=object) if EVENT in df.columns else np.full(len(df), "view", dtype=object)
    nan = np.full(len(df), np.nan)
    rt = df[RATING].to_numpy(np.float64, na_value=np.nan) if RATING in df.columns else nan
    out = []
    for user in sorted(span) if user_ids is None else user_ids:
        s, e = span.get(str(user), (0, 0))
        if max_len is not None:
            s = max(s, e - max_len)
        out.append(History(user_id=str(user), item_idx=idx[s:e], ts=ts[s:e], event=ev[s:e], rating=rt[s:e]))
    return out
