"""Evaluation splits of a canonical interactions table: leave-last-out per user, a global time cutoff, and
held-out (cold) items.

Each returns a `Split`:
- `train`: the events models are fit on.
- `history`: the events a model may read when it recommends for a test user (its input `History`).
- `test`: one row per (user, target item), with booleans `is_cold` (the target item is absent from `train`)
  and `ts_tied` (another event of the same user has the target's timestamp, so the order chose it).

Ordering and ties (deterministic, independent of the input row order): every user's events are sorted by
`ts`, same-timestamp events in a seeded random order (`llmrec.data.order.sort_events(df, seed)`, the order
every stage uses). "Last" means last in that order: among a user's events at the last timestamp, the test
target is a uniformly drawn one (per seed). `stats["n_test_ts_tied"]` counts tied targets; evaluation also
reports the users whose target is not tied.

Leave-last-out (`leave_last_out`, protocol "loo", the SASRec protocol): per user, last event = test, the one
before = validation, the rest = train. Users with fewer than 3 events are train-only (counted in
`stats["n_users_train_only"]` and logged). Models are fit on train; at test time a user's history is train +
validation (everything before the test event), so `history` = train + valid. Validation events are there for
early stopping / tuning by callers; `evaluate` does not tune on them.

Global time cutoff (`time_split`, protocol "time"): `cutoff_ts` defaults to the (1 - test_frac) quantile of
all event timestamps (so about `test_frac` of the *events*, not of the calendar span, fall after it; events at
exactly the cutoff are train). Train = events with ts <= cutoff; history = train. Test users are users with
train history and at least one later event; their target is the **first** post-cutoff event
(`targets="first"`, default: the next thing the user did, given everything known at the cutoff) or every
distinct post-cutoff item (`targets="all"`). Cold items = items first seen after the cutoff (never in
train); cold users = users whose events all fall after the cutoff (they have no history, so they are
counted, not evaluated).

Held-out items (`cold_item_split`, protocol "cold"): `round(frac * n)` of the n items with at least one event
are drawn at random (`numpy.random.default_rng(seed)` over the sorted item ids, so the draw depends only on
the set of items and the seed) and held out entirely: every event on them leaves train. Train = every other
event; history = train (a test user's history is all their train events). Test = one row per distinct
(user, held-out item) for users with at least one train event (the user's first event on that item), all
`is_cold`. Users whose events are all on held-out items are cold users: counted, not evaluated. Every
held-out event is a test row, a repeat of a test row's (user, item) (`n_heldout_repeat_events`), or a cold
user's (`n_cold_user_events`). Unlike loo/time, where 11-37 targets are cold, here every target is, so item
cold start is measured on thousands of targets; time plays no part (a test target may precede some of the
user's train events, as with any held-out-item protocol).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd

from llmrec.data.order import sort_events, tied_ts
from llmrec.schema import ITEM_ID, TS, USER_ID

logger = logging.getLogger(__name__)

__all__ = ["Split", "cold_item_split", "leave_last_out", "time_split", "visible_text_events"]


@dataclass(frozen=True)
class Split:
    """One evaluation split; see the module docstring for what each table holds."""

    protocol: str  # "loo" | "time" | "cold"
    train: pd.DataFrame  # fit set
    history: pd.DataFrame  # what models see at recommendation time (sorted per user)
    valid: pd.DataFrame  # loo: 2nd-to-last event per user; time, cold: empty
    test: pd.DataFrame  # one row per (user, target item); column `is_cold`
    cold_items: np.ndarray  # (C,) item ids never seen in train (time: post-cutoff; cold: the held-out ones)
    cold_users: np.ndarray  # (U,) user ids with test-side events but no train events (time, cold)
    stats: dict[str, Any] = field(default_factory=dict)
    seed: int = 0  # the tie order of the split (histories must be ordered with the same seed)

    def targets_by_user(self) -> dict[str, np.ndarray]:
        """user_id -> item ids (object array) of that user's test targets, in event order."""
        return {u: g[ITEM_ID].to_numpy() for u, g in self.test.groupby(USER_ID, sort=False)}


def leave_last_out(interactions: pd.DataFrame, seed: int = 0) -> Split:
    """Leave-last-out per user by time (train / valid / test); see the module docstring.

    seed: orders same-timestamp events (which of a user's last-second events is the target).
    """
    t0 = time.perf_counter()
    df = sort_events(interactions, seed)
    df = df.assign(ts_tied=tied_ts(df))
    n_per_user = df.groupby(USER_ID, sort=False)[USER_ID].transform("size").to_numpy()
    pos_from_end = n_per_user - 1 - df.groupby(USER_ID, sort=False).cumcount().to_numpy()
    eligible = n_per_user >= 3
    test_m, valid_m = eligible & (pos_from_end == 0), eligible & (pos_from_end == 1)
    test = df[test_m].reset_index(drop=True)
    df = df.drop(columns="ts_tied")
    train = df[~(test_m | valid_m)].reset_index(drop=True)
    valid = df[valid_m].reset_index(drop=True)
    history = df[~test_m].reset_index(drop=True)
    train_items = set(train[ITEM_ID].unique())
    test = test.assign(is_cold=~test[ITEM_ID].isin(train_items))
    n_train_only = int(df.loc[~eligible, USER_ID].nunique())
    stats = {
        "n_events": len(df),
        "n_users": int(df[USER_ID].nunique()),
        "n_test_users": len(test),
        "n_users_train_only": n_train_only,
        "n_train": len(train),
        "n_valid": len(valid),
        "n_test": len(test),
        "n_cold_test_events": int(test["is_cold"].sum()),
        "n_test_ts_tied": int(test["ts_tied"].sum()),
        "seed": int(seed),
    }
    logger.info(
        "loo split: %d events, %d users -> %d test users, %d users with < 3 events kept train-only, "
        "%d cold test targets, %d targets share their timestamp with another event (%.2fs)",
        len(df),
        stats["n_users"],
        len(test),
        n_train_only,
        stats["n_cold_test_events"],
        stats["n_test_ts_tied"],
        time.perf_counter() - t0,
    )
    cold_items = np.sort(test.loc[test["is_cold"], ITEM_ID].unique()).astype(object)
    return Split("loo", train, history, valid, test, cold_items, np.array([], dtype=object), stats, seed)


def time_split(
    interactions: pd.DataFrame,
    test_frac: float = 0.1,
    cutoff_ts: int | None = None,
    targets: Literal["first", "all"] = "first",
    seed: int = 0,
) -> Split:
    """Global time cutoff split; see the module docstring.

    Args:
        interactions: canonical interactions (user_id, item_id, ts, ...).
        test_frac: share of events after the default cutoff, in (0, 1); ignored when cutoff_ts is given.
        cutoff_ts: events with ts <= cutoff_ts are train.
        targets: "first" post-cutoff event per user, or "all" distinct post-cutoff items.
        seed: orders same-timestamp events (which of a user's first post-cutoff events is the target).
    """
    t0 = time.perf_counter()
    if targets not in ("first", "all"):
        raise ValueError(f"targets must be 'first' or 'all', got {targets!r}")
    df = sort_events(interactions, seed)
    tied = tied_ts(df)
    if cutoff_ts is None:
        if not 0.0 < test_frac < 1.0:
            raise ValueError(
                f"test_frac must be in (0, 1), got {test_frac}; e.g. 0.1 for the last 10% of events"
            )
        cutoff_ts = int(np.quantile(df[TS].to_numpy(), 1.0 - test_frac, method="lower"))
    after = df[TS].to_numpy() > cutoff_ts
    train = df[~after].reset_index(drop=True)
    post = df[after]
    if len(train) == 0 or len(post) == 0:
        raise ValueError(
            f"time cutoff {cutoff_ts} leaves {len(train)} train and {len(post)} later events; "
            f"timestamps span {df[TS].min()}..{df[TS].max()}: pick a cutoff inside that range"
        )
    train_users = set(train[USER_ID].unique())
    train_items = set(train[ITEM_ID].unique())
    has_hist = post[USER_ID].isin(train_users).to_numpy()
    cold_users = np.sort(post.loc[~has_hist, USER_ID].unique()).astype(object)
    cand = post[has_hist].assign(ts_tied=tied[after][has_hist])
    if targets == "first":
        test = cand.groupby(USER_ID, sort=False).head(1)
    else:
        test = cand.drop_duplicates([USER_ID, ITEM_ID], keep="first")
    test = test.reset_index(drop=True)
    test = test.assign(is_cold=~test[ITEM_ID].isin(train_items))
    post_items = post[ITEM_ID].unique()
    cold_items_all = np.sort(post_items[~pd.Series(post_items).isin(train_items).to_numpy()]).astype(object)
    stats = {
        "n_events": len(df),
        "cutoff_ts": int(cutoff_ts),
        "targets": targets,
        "n_train": len(train),
        "n_post_cutoff": int(after.sum()),
        "post_cutoff_frac": float(after.mean()),
        "n_test_users": int(test[USER_ID].nunique()),
        "n_test": len(test),
        "n_cold_users": len(cold_users),
        "n_cold_items": len(cold_items_all),
        "n_cold_test_events": int(test["is_cold"].sum()),
        "n_test_ts_tied": int(test["ts_tied"].sum()),
        "seed": int(seed),
    }
    logger.info(
        "time split at ts=%d: %d train / %d post-cutoff events (%.1f%%); %d test users, %d test targets "
        "(%d on cold items); %d cold items, %d cold users not evaluated (%.2fs)",
        cutoff_ts,
        len(train),
        stats["n_post_cutoff"],
        100 * stats["post_cutoff_frac"],
        stats["n_test_users"],
        len(test),
        stats["n_cold_test_events"],
        len(cold_items_all),
        len(cold_users),
        time.perf_counter() - t0,
    )
    empty = df.iloc[:0].reset_index(drop=True)
    return Split("time", train, train, empty, test, cold_items_all, cold_users, stats, seed)


def cold_item_split(interactions: pd.DataFrame, frac: float = 0.1, seed: int = 0) -> Split:
    """Hold out a random `frac` of the items with all their events; see the module docstring.

    Args:
        interactions: canonical interactions (user_id, item_id, ts, ...).
        frac: share of the items with at least one event to hold out, in (0, 1); `round(frac * n)` items,
            at least 1 and fewer than n.
        seed: seeds the draw of held-out items (the same seed and item set give the same items) and the
            order of same-timestamp events.

    Returns:
        Split with protocol "cold": `train` = `history` = events on other items (sorted per user), `valid`
        empty, `test` one row per (user, held-out item) with `is_cold` True, `cold_items` (C,) the held-out
        item ids (sorted), `cold_users` (U,) users with only held-out-item events (sorted).

    Raises:
        ValueError: frac outside (0, 1), or it holds out no item or every item.
    """
    t0 = time.perf_counter()
    if not 0.0 < frac < 1.0:
        raise ValueError(f"frac must be in (0, 1), got {frac}; e.g. 0.1 to hold out 10% of the items")
    df = sort_events(interactions, seed)
    tied = tied_ts(df)
    items = np.sort(df[ITEM_ID].unique()).astype(object)  # sorted: the draw ignores the input row order
    n_hold = int(round(frac * len(items)))
    if not 0 < n_hold < len(items):
        raise ValueError(
            f"frac {frac} of {len(items)} items holds out {n_hold}; pick a frac that holds out at least one "
            f"item and keeps at least one for training"
        )
    held = np.sort(np.random.default_rng(seed).choice(items, size=n_hold, replace=False)).astype(object)
    on_held = df[ITEM_ID].isin(set(held)).to_numpy()
    train = df[~on_held].reset_index(drop=True)
    post = df[on_held]
    train_users = set(train[USER_ID].unique())
    has_hist = post[USER_ID].isin(train_users).to_numpy()
    cold_users = np.sort(post.loc[~has_hist, USER_ID].unique()).astype(object)
    cand = post[has_hist].assign(ts_tied=tied[on_held][has_hist])
    test = cand.drop_duplicates([USER_ID, ITEM_ID], keep="first").reset_index(drop=True)
    test = test.assign(is_cold=np.ones(len(test), dtype=bool))
    if len(test) == 0:
        raise ValueError(
            f"the {n_hold} held-out items have no event from a user with other events, so there is nothing "
            f"to evaluate; use a larger frac or another seed"
        )
    stats = {
        "n_events": len(df),
        "frac": float(frac),
        "seed": int(seed),
        "n_items": len(items),
        "n_heldout_items": n_hold,
        "n_heldout_items_tested": int(test[ITEM_ID].nunique()),
        "n_heldout_events": int(on_held.sum()),
        "n_train": len(train),
        "n_test_users": int(test[USER_ID].nunique()),
        "n_test": len(test),
        "n_heldout_repeat_events": len(cand) - len(test),
        "n_cold_users": len(cold_users),
        "n_cold_user_events": int((~has_hist).sum()),
        "n_cold_test_events": len(test),
        "n_test_ts_tied": int(test["ts_tied"].sum()),
    }
    logger.info(
        "cold split (frac %.3g, seed %d): %d of %d items held out with %d events -> %d train events; %d test "
        "targets for %d users (%d repeat events); %d cold users (%d events) not evaluated (%.2fs)",
        frac,
        seed,
        n_hold,
        len(items),
        stats["n_heldout_events"],
        len(train),
        len(test),
        stats["n_test_users"],
        stats["n_heldout_repeat_events"],
        len(cold_users),
        stats["n_cold_user_events"],
        time.perf_counter() - t0,
    )
    empty = df.iloc[:0].reset_index(drop=True)
    return Split("cold", train, train, empty, test, held, cold_users, stats, seed)


def visible_text_events(split: Split, events: pd.DataFrame) -> np.ndarray:
    """bool (n,): which user-written texts (tags, reviews: user_id, item_id, ts rows) existed before the
    split's cutoff, i.e. may be part of the item text models see.

    loo: written before their writer's first held-out event (its validation event, else its test event;
    a text at that very second is not visible); users without held-out events: all. time: ts <= cutoff.
    cold: not on a held-out item (time plays no part in that protocol).
    """
    if split.protocol == "time":
        return events[TS].to_numpy() <= int(split.stats["cutoff_ts"])
    if split.protocol == "cold":
        return ~events[ITEM_ID].astype(str).isin(set(map(str, split.cold_items))).to_numpy()
    if split.protocol != "loo":
        raise ValueError(f"unknown protocol {split.protocol!r}; expected loo, time or cold")
    held = pd.concat([split.valid[[USER_ID, TS]], split.test[[USER_ID, TS]]], ignore_index=True)
    first_held = held.groupby(held[USER_ID].astype(str))[TS].min()
    cut = events[USER_ID].astype(str).map(first_held).to_numpy(dtype=np.float64)  # NaN: no held-out event
    return np.isnan(cut) | (events[TS].to_numpy(dtype=np.float64) < cut)
