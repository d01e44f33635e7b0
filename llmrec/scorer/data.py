"""Training samples for the scorer: (history prefix, next item) pairs from canonical interactions.

Choices (the design doc is silent on them):
- Each user's events are ordered by `ts`, same-timestamp events in the seeded random order of
  `llmrec.data.order.sort_events` (the one event order of every stage). Every event at position t >= 1 whose
  kind is a *target kind* (all kinds except "dislike" and "skip"; for "rating" events, only
  rating >= min_rating when min_rating is set) becomes a target; its history is the up-to-L events before
  it (every kind, negative ones included, so the encoder sees dislikes through their event embedding).
- Histories are right-padded (first `hist_len` columns real, oldest first); padding is item 0 / event 0.
- Negatives are drawn in the training loop: in-batch (the other targets) plus `n_neg` items sampled from a
  mixture of uniform and popularity^alpha over the catalog (`sample_negatives`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from llmrec.data.histories import attach_item_idx, make_histories
from llmrec.data.order import sort_events
from llmrec.protocol import History, ItemSpace
from llmrec.schema import EVENT, EVENT_INDEX, EVENT_KINDS, NEGATIVE_KINDS, RATING, TS, USER_ID

logger = logging.getLogger(__name__)

SAMPLE_COLUMNS = ("hist_idx", "hist_event", "hist_rating", "hist_len", "target", "target_ts")


def target_mask(df: pd.DataFrame, min_rating: float | None = None) -> np.ndarray:
    """bool (n,): which events may be a training/validation target (see module docstring)."""
    ev = df[EVENT].astype(str).to_numpy()
    ok = ~np.isin(ev, NEGATIVE_KINDS)
    if min_rating is not None and RATING in df.columns:
        r = df[RATING].to_numpy(dtype=np.float64, na_value=np.nan)
        ok &= ~((ev == "rating") & (np.nan_to_num(r, nan=np.inf) < min_rating))
    return ok


def build_samples(
    interactions: pd.DataFrame, items: ItemSpace, max_len: int = 50, min_rating: float | None = None
) -> dict[str, np.ndarray]:
    """(history prefix, next item) training pairs.

    Args:
        interactions: canonical columns (user_id, item_id, ts, rating, event), optionally `item_idx`.
        items: the catalog index space.
        max_len: L, most recent history events kept.
        min_rating: rating events below this are not targets (None = every rating is a target).

    Returns:
        dict of numpy arrays, S samples: hist_idx int32 (S, L), hist_event int8 (S, L), hist_rating float32
        (S, L) (NaN = none), hist_len int64 (S,), target int64 (S,), target_ts int64 (S,) (the target's ts).
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    df = sort_events(attach_item_idx(interactions, items))
    n = len(df)
    item = df["item_idx"].to_numpy(dtype=np.int64)
    event = df[EVENT].astype(str).map(EVENT_INDEX).to_numpy(dtype=np.int8)
    rating = (
        df[RATING].to_numpy(dtype=np.float32, na_value=np.nan)
        if RATING in df.columns
        else np.full(n, np.nan, "f4")
    )
    user_codes, _ = pd.factorize(df[USER_ID].astype(str))
    pos = np.arange(n)
    first = np.r_[True, user_codes[1:] != user_codes[:-1]] if n else np.zeros(0, bool)
    user_start = np.maximum.accumulate(np.where(first, pos, 0)) if n else pos
    keep = (pos > user_start) & target_mask(df, min_rating)
    g = pos[keep]  # (S,) global position of each target
    start = np.maximum(user_start[keep], g - max_len)
    hist_len = (g - start).astype(np.int64)
    cols = start[:, None] + np.arange(max_len)[None, :]  # (S, L)
    valid = np.arange(max_len)[None, :] < hist_len[:, None]
    cols = np.where(valid, cols, 0)
    out = {
        "hist_idx": np.where(valid, item[cols] if n else 0, 0).astype(np.int32),
        "hist_event": np.where(valid, event[cols] if n else 0, 0).astype(np.int8),
        "hist_rating": np.where(valid, rating[cols] if n else np.nan, np.nan).astype(np.float32),
        "hist_len": hist_len,
        "target": item[g],
        "target_ts": df[TS].to_numpy(dtype=np.int64)[g] if n else np.zeros(0, np.int64),
    }
    logger.info(
        "built %d training samples from %d events of %d users (L=%d)", len(g), n, first.sum(), max_len
    )
    return out


@dataclass(frozen=True)
class ValidationSet:
    """Validation users: their train history (encoder input), held-out targets, and train items to exclude;
    optionally one synthesised text feedback per user (held-out phrasings, `scorer.feedback`)."""

    hist_idx: np.ndarray  # int32 (U, L)
    hist_event: np.ndarray  # int8 (U, L)
    hist_rating: np.ndarray  # float32 (U, L)
    hist_len: np.ndarray  # int64 (U,)
    targets: list[np.ndarray]  # U arrays of held-out item indices
    exclude: list[np.ndarray]  # U arrays of the user's train item indices
    # U arrays of the user's distinct train items of positive kinds (co-occurrence)
    positives: list[np.ndarray]
    fb_vec: np.ndarray | None = None  # float32 (U, 1, D) text feedback vector (zeros where none)
    fb_pol: np.ndarray | None = None  # float32 (U, 1) its polarity, +1 / -1 / 0 = none
    fb_facet: np.ndarray | None = None  # int64 (U,) the facet the text names (-1 = none)

    @property
    def n_users(self) -> int:
        return len(self.targets)


def build_validation(
    train: pd.DataFrame,
    valid: pd.DataFrame,
    items: ItemSpace,
    max_len: int = 50,
    min_rating: float | None = None,
) -> ValidationSet:
    """Validation users = users with a target event in `valid` and at least one train event.

    Users in `valid` without train history are counted and logged (they cannot be scored by a sequential
    model without a history); their rows are not used.
    """
    tr = sort_events(attach_item_idx(train, items))
    va = attach_item_idx(valid, items)
    va = va[target_mask(va, min_rating)]
    hist = make_histories(tr)
    by_user = {h.user_id: h for h in hist}
    targets, exclude, positives, hs = [], [], [], []
    n_cold = 0
    for uid, grp in va.groupby(va[USER_ID].astype(str), sort=True):
        h = by_user.get(uid)
        if h is None:
            n_cold += 1
            continue
        hs.append(h)
        targets.append(np.unique(grp["item_idx"].to_numpy(dtype=np.int64)))
        exclude.append(np.unique(h.item_idx))
        positives.append(positive_items(h))
    if n_cold:
        logger.info("validation: %d users without train history left out of validation", n_cold)
    arrs = pad_histories(hs, max_len)
    return ValidationSet(*arrs, targets=targets, exclude=exclude, positives=positives)


def positive_items(h: History) -> np.ndarray:
    """int64: the distinct items of a history's positive events (not dislike / skip), sorted."""
    idx = np.asarray(h.item_idx, dtype=np.int64)
    if h.event is None or len(h.event) != len(idx):
        return np.unique(idx)
    return np.unique(idx[~np.isin(np.asarray(h.event).astype(str), NEGATIVE_KINDS)])


def pad_histories(
    histories: list[History], max_len: int, n_items: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Histories -> right-padded hist_idx int32 (B, L), hist_event int8, hist_rating float32, hist_len.

    The last max_len events of each history are kept. Unknown event kinds or out-of-range indices raise.
    """
    B = len(histories)
    idx = np.zeros((B, max_len), np.int32)
    ev = np.zeros((B, max_len), np.int8)
    rt = np.full((B, max_len), np.nan, np.float32)
    ln = np.zeros(B, np.int64)
    for b, h in enumerate(histories):
        n = min(len(h.item_idx), max_len)
        if n == 0:
            continue
        ii = np.asarray(h.item_idx[-n:], dtype=np.int64)
        if n_items is not None and (ii.min() < 0 or ii.max() >= n_items):
            raise ValueError(
                f"history of user {h.user_id!r} has item_idx outside [0, {n_items}): {ii.min()}..{ii.max()}"
            )
        kinds = [EVENT_INDEX.get(str(e)) for e in np.asarray(h.event)[-n:]]
        if any(k is None for k in kinds):
            bad = sorted({str(e) for e, k in zip(np.asarray(h.event)[-n:], kinds, strict=True) if k is None})
            raise ValueError(
                f"history of user {h.user_id!r} has unknown event kinds {bad}; expected {list(EVENT_KINDS)}"
            )
        idx[b, :n] = ii
        ev[b, :n] = kinds
        if h.rating is not None and len(h.rating):
            rt[b, :n] = np.asarray(h.rating, dtype=np.float32)[-n:]
        ln[b] = n
    return idx, ev, rt, ln


MAX_TEXTS = 8  # text feedbacks per user the encoder reads (the most recent)


def pad_feedback(
    histories: list[History], dim: int, max_texts: int = MAX_TEXTS
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Histories' text feedback -> fb_vec float32 (B, T, D), fb_pol float32 (B, T) (0 = empty slot), the last
    max_texts texts of each user (oldest first); (None, None) when no history carries any."""
    if not any(h.fb_vec is not None and len(h.fb_vec) for h in histories):
        return None, None
    T = min(max_texts, max(len(h.fb_vec) if h.fb_vec is not None else 0 for h in histories))
    vec = np.zeros((len(histories), T, dim), np.float32)
    pol = np.zeros((len(histories), T), np.float32)
    for b, h in enumerate(histories):
        if h.fb_vec is None or not len(h.fb_vec):
            continue
        v = np.asarray(h.fb_vec, dtype=np.float32)[-T:]
        pp = np.asarray(h.fb_pol, dtype=np.float32)[-T:] if h.fb_pol is not None else None
        if v.ndim != 2 or v.shape[1] != dim or pp is None or pp.shape != (len(v),):
            raise ValueError(
                f"text feedback of user {h.user_id!r} must be fb_vec (T, {dim}) with fb_pol (T,), got "
                f"{v.shape} and {None if pp is None else pp.shape}; encode texts with the items' encoder"
            )
        vec[b, : len(v)] = v
        pol[b, : len(v)] = np.sign(pp)
    return vec, pol


def popularity(train: pd.DataFrame, items: ItemSpace) -> np.ndarray:
    """float64 (N,) train event counts per catalog item (after attach_item_idx)."""
    idx = attach_item_idx(train, items)["item_idx"].to_numpy(dtype=np.int64)
    return np.bincount(idx, minlength=items.n_items).astype(np.float64)


def negative_distribution(pop: np.ndarray, uniform_frac: float = 0.5, alpha: float = 0.75) -> np.ndarray:
    """float64 (N,) sampling probabilities: uniform_frac * uniform + (1 - uniform_frac) * pop^alpha."""
    n = len(pop)
    p = np.full(n, 1.0 / n)
    w = np.power(np.asarray(pop, dtype=np.float64), alpha)
    if w.sum() > 0 and uniform_frac < 1.0:
        p = uniform_frac * p + (1.0 - uniform_frac) * w / w.sum()
    return p / p.sum()
