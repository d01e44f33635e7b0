"""The one order of events shared by every stage: by user, then time, then a seeded pseudo-random tie key.

Why a random tie key: many sources stamp events coarsely (Amazon: whole days; MovieLens: a rating session
shares its second), so "the last event" of a user is often one of several events at the same time. Ordering
those by item id (or by file row) makes the choice systematic: on Magazine the "last" event was mostly the
largest ASIN of the day's basket. Here each event gets a 64-bit key hashed from its own content (user,
item, ts, event and rating when present) and a seed, so:

- same-timestamp events of a user come in an order that is random (uniform over the set: the last of them is
  a uniformly drawn member) yet reproducible for a given seed;
- the order does not depend on the input row order (only on the events themselves);
- two stages that sort the same events with the same seed agree (training pairs, evaluation splits,
  histories, llmrec's inner validation split).

`tied_ts(df)` flags the events that share their (user, ts) with another event of the user: evaluation reports
the test users whose target is not tied (the unique-last-timestamp subset), where the order is unambiguous.

Example::

    df = sort_events(interactions, seed=0)
    train, valid = split_last_event(df, max_users=1000, seed=0)
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from llmrec.schema import EVENT, ITEM_ID, RATING, TS, USER_ID

__all__ = ["frame_fingerprint", "sample_rows", "sort_events", "split_last_event", "tie_key", "tied_ts"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def tie_key(df: pd.DataFrame, seed: int = 0) -> np.ndarray:
    """uint64 (n,): a seeded pseudo-random key per event, a function of the event's own columns only.

    Columns hashed: user_id, item_id, ts, and event / rating when present (identical events get equal keys,
    so their relative order does not matter).
    """
    cols = [c for c in (USER_ID, ITEM_ID, TS, EVENT, RATING) if c in df.columns]
    if not len(df):
        return np.zeros(0, dtype=np.uint64)
    frame = df[cols].copy()
    for c in (USER_ID, ITEM_ID, EVENT):
        if c in frame.columns:
            frame[c] = frame[c].astype(
                str
            )  # the same text hashes alike whatever its dtype (category, object)
    h = pd.util.hash_pandas_object(frame, index=False).to_numpy(dtype=np.uint64)
    with np.errstate(over="ignore"):
        return _splitmix64(h + np.uint64(seed % 2**64) * _GOLDEN)


def sort_events(df: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Events sorted by user_id, ts, then `tie_key(df, seed)`, with a fresh RangeIndex.

    Args:
        df: a frame with at least user_id, item_id, ts (the canonical interactions, or a subset).
        seed: seeds the order of same-timestamp events of a user.

    Returns:
        The same rows, sorted; the input is not modified.
    """
    missing = [c for c in (USER_ID, ITEM_ID, TS) if c not in df.columns]
    if missing:
        raise ValueError(
            f"events lack columns {missing}; expected at least {[USER_ID, ITEM_ID, TS]}, got "
            f"{list(df.columns)}; pass the table written by `llmrec prepare`"
        )
    if df[USER_ID].isna().any() or df[ITEM_ID].isna().any() or df[TS].isna().any():
        raise ValueError("events have null user_id / item_id / ts values; re-run `llmrec prepare`")
    key = "__tie_key"
    out = df.assign(**{key: tie_key(df, seed)})
    out = out.sort_values([USER_ID, TS, key], kind="mergesort").drop(columns=key)
    return out.reset_index(drop=True)


def tied_ts(df: pd.DataFrame) -> np.ndarray:
    """bool (n,): the event shares its (user_id, ts) with at least one other event of that user."""
    if not len(df):
        return np.zeros(0, dtype=bool)
    return df.groupby([USER_ID, TS], sort=False)[TS].transform("size").to_numpy() > 1


def split_last_event(
    df: pd.DataFrame, max_users: int | None = None, seed: int = 0
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, valid): each user's last event (in `sort_events(df, seed)` order) goes to valid when the
    user has >= 2 events; everything else stays in train. Both come back sorted in that order.

    The inner validation split of llmrec's training and of the baselines' tuning (the same call with the same
    seed gives the same split).

    max_users: hold out the last event of at most this many users (a seeded random sample of the eligible
    ones; None = all). Every held-out event is a training pair lost: on Magazine's leave-last-out train
    split (76,240 events, most users with 1-3), holding out all 8,535 eligible users left 1,910 training
    pairs, 1,000 users left 9,445.
    """
    if max_users is not None and max_users < 0:
        raise ValueError(f"max_users must be >= 0 or None, got {max_users}")
    d = sort_events(df, seed)
    n_per_user = d.groupby(USER_ID, sort=False)[TS].transform("size").to_numpy()
    is_last = ~d[USER_ID].duplicated(keep="last").to_numpy()
    to_valid = is_last & (n_per_user >= 2)
    if max_users is not None and to_valid.sum() > max_users:
        rows = np.flatnonzero(to_valid)
        keep = np.random.default_rng(seed).choice(len(rows), size=max_users, replace=False)
        to_valid = np.zeros(len(d), bool)
        to_valid[rows[keep]] = True
    return d[~to_valid].reset_index(drop=True), d[to_valid].reset_index(drop=True)


def sample_rows(df: pd.DataFrame, max_rows: int | None, seed: int = 0) -> pd.DataFrame:
    """At most `max_rows` rows of df, a seeded random sample kept in df's order (None or enough: all rows).

    The same draw as `split_last_event`'s user sample (numpy default_rng(seed).choice over row positions);
    used to cap loo validation events at llmrec's `val_users`.
    """
    if max_rows is None or len(df) <= max_rows:
        return df.reset_index(drop=True)
    if max_rows < 0:
        raise ValueError(f"max_rows must be >= 0 or None, got {max_rows}")
    keep = np.sort(np.random.default_rng(seed).choice(len(df), size=max_rows, replace=False))
    return df.iloc[keep].reset_index(drop=True)


def frame_fingerprint(df: pd.DataFrame) -> str:
    """16 hex digits identifying a set of events by (user_id, item_id, ts), whatever their row order."""
    import hashlib

    cols = [USER_ID, ITEM_ID, TS]
    lines = (
        np.sort(
            (
                df[USER_ID].astype(str)
                + "\t"
                + df[ITEM_ID].astype(str)
                + "\t"
                + df[TS].astype("int64").astype(str)
            ).to_numpy(dtype=str)
        )
        if len(df)
        else np.zeros(0, dtype=str)
    )
    h = hashlib.sha256(f"{cols}:{len(lines)}\n".encode())
    h.update("\n".join(lines.tolist()).encode())
    return h.hexdigest()[:16]


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x += _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))
