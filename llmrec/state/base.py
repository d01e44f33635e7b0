"""Base histories: what a run already knows about its users, held compactly by each state shard.

A serving run's users are in `RUN/data/interactions.parquet` (canonical columns user_id, item_id, ts,
rating, event). Each `UserStateShard` calls `load_base` itself: it streams the file in record batches, keeps
the rows of ITS users (`shard_of(user_id, n_shards)`, computed per batch on the distinct ids with a
vectorised crc32 equal to `zlib.crc32`), and keeps the last `history_len` events per user in time order
(ts, ties in file order). Memory stays near the kept rows: buffered rows are compacted to the last
`history_len` per user whenever `compact_rows` of them have piled up.

`BaseHistories` holds them as numpy arrays, not as one `UserState` per user::

    user_keys    (U,)    bytes 'S<w>', sorted utf-8 user ids (binary search)
    offsets      (U+1,)  int64: user r's events are rows offsets[r]:offsets[r+1], oldest first
    item_code    (E,)    int32 into item_vocab (sorted utf-8 item ids of this shard)
    event_code   (E,)    int8 into schema.EVENT_KINDS
    rating       (E,)    float32, NaN = no rating (the history entry's `value`)
    ts           (E,)    float64 unix seconds
    n_total      (U,)    int32: the user's events in the file (>= its kept events: n_events / version)
    older_offsets/older_code: the distinct items of the user's events older than the kept window that the
                 window does not hold (they stay in `seen`, so serving never re-recommends them); None when
                 no user has more than `history_len` events.

`state(row)` builds the `UserState` folding `apply_event` over the kept events would give
(`user_state.state_from_history`): history, `seen` (window + older items), negatives (from the kept window),
`n_events` = `version` = all the user's events in the file, `last_ts`.

Rows that cannot be served are skipped, counted in `BaseHistories.skipped` and logged: null or empty ids, ids
longer than `schema.MAX_ID_CHARS` characters (the HTTP API could never ask for them) or ending in a NUL byte
(the fixed-width key arrays cannot hold one), null ts, unknown event kinds, and rating events whose rating is
null or outside [0, 5] (the live API refuses those too).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from llmrec.schema import (
    EVENT,
    EVENT_KINDS,
    INTERACTIONS_FILE,
    ITEM_ID,
    MAX_ID_CHARS,
    META_FILE,
    RATING,
    TS,
    USER_ID,
)
from llmrec.state.user_state import RATING_MAX, RATING_MIN, UserState, state_from_history

logger = logging.getLogger(__name__)

__all__ = ["BaseHistories", "load_base", "base_descriptor", "interactions_path", "crc32_strings"]

_COLUMNS = [USER_ID, ITEM_ID, TS, RATING, EVENT]
_FIX = "re-run `llmrec prepare` to write a canonical RUN/data/interactions.parquet"


# --------------------------------------------------------------------------------------------- locating


def interactions_path(data_dir: str | os.PathLike) -> Path:
    """`data_dir/interactions.parquet` (or `data_dir` itself when it is that file); else FileNotFoundError."""
    p = Path(data_dir)
    path = p / INTERACTIONS_FILE if p.is_dir() else p
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: the state shards load the run's users from a prepared data folder "
            f"(RUN/data with {INTERACTIONS_FILE}); pass such a folder or none (start empty)"
        )
    return path.resolve()


def base_descriptor(data_dir: str | os.PathLike, history_len: int) -> dict[str, Any]:
    """What identifies a base without reading it: path, size, mtime_ns, the prepare fingerprint, history_len.

    Two equal descriptors mean the same base histories, so a snapshot taken over one is valid over the other.
    """
    path = interactions_path(data_dir)
    st = path.stat()
    meta_path = path.parent / META_FILE
    fingerprint = None
    if meta_path.is_file():
        try:
            fingerprint = json.loads(meta_path.read_text()).get("fingerprint")
        except (OSError, ValueError):
            logger.warning("%s is unreadable; the base is identified by file size and mtime only", meta_path)
    return {"path": str(path), "size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns),
            "prepare_fingerprint": fingerprint, "history_len": int(history_len)}


# --------------------------------------------------------------------------------------------- hashing


@functools.cache
def _crc_table() -> np.ndarray:
    c = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        c = np.where(c & 1, np.uint32(0xEDB88320) ^ (c >> 1), c >> 1).astype(np.uint32)
    return c


def _string_buffers(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(offsets int64 (n+1,), data uint8) of a string/binary array, zero-copy views where possible."""
    if pa.types.is_large_string(arr.type) or pa.types.is_large_binary(arr.type):
        off_dtype = np.int64
    elif pa.types.is_string(arr.type) or pa.types.is_binary(arr.type):
        off_dtype = np.int32
    else:
        raise TypeError(f"expected a string array, got {arr.type}")
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], dtype=off_dtype)[arr.offset: arr.offset + len(arr) + 1].astype(np.int64)
    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    return offsets, data


def crc32_strings(arr: pa.Array) -> np.ndarray:
    """zlib.crc32 of each value's utf-8 bytes, vectorised (one numpy pass per byte position).

    Returns:
        uint32 (n,); nulls hash as the empty string.
    """
    offsets, data = _string_buffers(arr)
    starts, lens = offsets[:-1], np.diff(offsets)
    crc = np.full(len(lens), 0xFFFFFFFF, dtype=np.uint32)
    table = _crc_table()
    by_len = np.argsort(-lens, kind="stable")  # rows still "active" at byte j are a prefix of this order
    sorted_lens = lens[by_len]
    for j in range(int(lens.max()) if len(lens) else 0):
        act = by_len[: int(np.searchsorted(-sorted_lens, -j, side="left"))]  # rows with len > j
        c = crc[act]
        crc[act] = table[(c ^ data[starts[act] + j]) & 0xFF] ^ (c >> 8)
    return crc ^ np.uint32(0xFFFFFFFF)


def _to_fixed_bytes(arr: pa.Array) -> np.ndarray:
    """A string array as a numpy 'S<w>' array (w = longest utf-8 value), built from the arrow buffers."""
    offsets, data = _string_buffers(arr)
    lens = np.diff(offsets)
    n = len(lens)
    w = max(int(lens.max()) if n else 1, 1)
    out = np.zeros((n, w), dtype=np.uint8)
    step = max(1, (64 << 20) // w)  # bound the (rows, w) index temporaries to ~64 MB
    cols = np.arange(w)
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        mask = cols[None, :] < lens[lo:hi, None]
        out[lo:hi][mask] = data[(offsets[lo:hi, None] + cols[None, :])[mask]]
    return out.view(f"S{w}").reshape(n)


def _plain(arr: pa.Array, col: str, path: Path) -> pa.Array:
    t = arr.type
    if pa.types.is_dictionary(t):
        arr, t = arr.dictionary_decode(), t.value_type
    if pa.types.is_string_view(t):
        arr, t = arr.cast(pa.string()), pa.string()
    if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
        raise ValueError(f"{path}: column {col!r} is {t}, expected string; {_FIX}")
    return arr


def _bad_ids(arr: pa.Array) -> np.ndarray:
    """True for values that cannot be served: empty, longer than MAX_ID_CHARS, or ending in a NUL byte."""
    offsets, data = _string_buffers(arr)
    lens = np.diff(offsets)
    bad = lens == 0
    bad |= pc.utf8_length(arr).to_numpy(zero_copy_only=False) > MAX_ID_CHARS
    ends = offsets[1:] - 1
    nonempty = lens > 0
    bad[nonempty] |= data[ends[nonempty]] == 0
    return bad


# --------------------------------------------------------------------------------------------- loading


@dataclass
class _Rows:
    """Buffered rows of this shard (file order, or compacted: grouped by user, time order)."""

    users: list[pa.Array] = field(default_factory=list)
    items: list[pa.Array] = field(default_factory=list)
    ts: list[np.ndarray] = field(default_factory=list)
    rating: list[np.ndarray] = field(default_factory=list)
    event: list[np.ndarray] = field(default_factory=list)
    n: int = 0

    def add(self, users: pa.Array, items: pa.Array, ts: np.ndarray, rating: np.ndarray, event: np.ndarray
            ) -> None:
        self.users.append(users)
        self.items.append(items)
        self.ts.append(ts)
        self.rating.append(rating)
        self.event.append(event)
        self.n += len(ts)


class _Compactor:
    """Keeps the last `history_len` rows per user; what falls out is remembered as per-user counts and
    distinct (user, item) pairs (for n_total and `seen`)."""

    def __init__(self, history_len: int, compact_rows: int) -> None:
        self.h = history_len
        self.compact_rows = compact_rows
        self.rows = _Rows()
        self.since = 0
        self.kept = 0  # rows kept by the last compaction
        self.dropped_users: list[np.ndarray] = []  # 'S' keys, one per (user, compaction) with dropped rows
        self.dropped_counts: list[np.ndarray] = []
        self.older_users: list[np.ndarray] = []  # 'S' keys of distinct dropped (user, item) pairs
        self.older_items: list[np.ndarray] = []

    def add(self, users: pa.Array, items: pa.Array, ts: np.ndarray, rating: np.ndarray, event: np.ndarray
            ) -> None:
        self.rows.add(users, items, ts, rating, event)
        self.since += len(ts)
        if self.since >= max(self.compact_rows, self.kept):  # geometric: O(rows) compaction work in total
            self.compact()

    def compact(self, final: bool = False) -> tuple[np.ndarray, np.ndarray] | None:
        """Keep the last h rows per user (by ts, then buffer order = file order).

        A non-final compaction with nothing to drop leaves the buffer as it is; the final one also sorts it
        by (user, ts, file order).

        Returns:
            final: (sorted unique user keys 'S' (U,), offsets int64 (U+1,)) of the kept rows (None if empty);
            else None.
        """
        r = self.rows
        self.since = 0
        if r.n == 0:
            return None
        users = pa.concat_arrays(r.users) if len(r.users) > 1 else r.users[0]
        items = pa.concat_arrays(r.items) if len(r.items) > 1 else r.items[0]
        ts, rating, event = (np.concatenate(x) if len(x) > 1 else x[0] for x in (r.ts, r.rating, r.event))
        for chunks in (r.users, r.items, r.ts, r.rating, r.event):
            chunks.clear()  # free the per-batch pieces now: peak memory is about one copy of the buffer
        n = len(ts)
        enc = pc.dictionary_encode(users)
        keys = _to_fixed_bytes(enc.dictionary)
        perm = np.argsort(keys, kind="stable")
        rank = np.empty(len(perm), dtype=np.int32)
        rank[perm] = np.arange(len(perm), dtype=np.int32)
        ucode = rank[enc.indices.to_numpy(zero_copy_only=False)]  # (n,) user rank in byte order
        del enc, rank
        counts = np.bincount(ucode, minlength=len(keys))  # every rank occurs: the dictionary is of these rows
        over = np.flatnonzero(counts > self.h)
        self.rows = _Rows()
        if not len(over) and not final:
            self.rows.add(users, items, ts, rating, event)
            self.kept = n
            return None
        order = np.lexsort((ts, ucode))  # stable: equal (user, ts) keep buffer order = file order
        del ucode
        starts = np.r_[0, np.cumsum(counts)[:-1]]  # group g = sorted rows starts[g] : starts[g] + counts[g]
        sorted_keys = keys[perm]
        keep = np.ones(n, dtype=bool)
        if len(over):
            n_drop = counts[over] - self.h  # the oldest rows of each long group go
            first = np.repeat(starts[over], n_drop)
            run_start = np.repeat(np.cumsum(n_drop) - n_drop, n_drop)
            drop_pos = first + (np.arange(len(first)) - run_start)  # (D,) positions in sorted order
            keep[drop_pos] = False
            self.dropped_users.append(sorted_keys[over])
            self.dropped_counts.append(n_drop.astype(np.int64))
            d_items = pc.dictionary_encode(items.take(pa.array(order[drop_pos])))
            n_dict = len(d_items.dictionary)
            icode = d_items.indices.to_numpy(zero_copy_only=False).astype(np.int64)
            pair = np.unique(np.repeat(over.astype(np.int64), n_drop) * n_dict + icode)
            ikeys = _to_fixed_bytes(d_items.dictionary)
            self.older_users.append(sorted_keys[pair // n_dict])
            self.older_items.append(ikeys[pair % n_dict])
        kept = order[keep]
        del order, keep
        take = pa.array(kept)
        kept_users = users.take(take) if not final else pa.array([], pa.string())  # final: keys say it all
        del users
        self.rows.add(kept_users, items.take(take), ts[kept], rating[kept], event[kept])
        self.kept = len(kept)
        kept_counts = np.minimum(counts, self.h)
        return (sorted_keys, np.r_[0, np.cumsum(kept_counts)].astype(np.int64)) if final else None


def load_base(data_dir: str | os.PathLike, *, shard_id: int = 0, n_shards: int | None = None,
              history_len: int = 200, deleted: Callable[[str], bool] | None = None, batch_rows: int = 1 << 18,
              compact_rows: int = 1 << 21, only: Sequence[str] | pa.Array | None = None) -> BaseHistories:
    """Stream `data_dir/interactions.parquet` and keep the last `history_len` events of this shard's users.

    Args:
        data_dir: a prepared data folder (RUN/data) or the interactions file itself.
        shard_id, n_shards: keep users with `shard_of(user_id, n_shards) == shard_id`; n_shards None = all.
        deleted: `is_deleted(user_id)` of users never to load (the shard's tombstones,
            `Tombstones.matcher()`); asked once per distinct id of this shard per batch.
        only: keep only these user ids (a batch job's users: memory follows them, not the run's users);
            None = every user of the shard.
        batch_rows: rows per record batch read.
        compact_rows: new rows that trigger a compaction (also at least the rows kept by the previous one), so
            memory stays near the kept rows when histories are longer than `history_len`.

    Returns:
        the `BaseHistories` of this shard (possibly with no users).

    Raises:
        FileNotFoundError: no interactions file. ValueError: missing or mistyped columns.
    """
    t0 = time.perf_counter()
    if not isinstance(history_len, int) or history_len < 1:
        raise ValueError(f"history_len must be an int >= 1, got {history_len!r}")
    desc = base_descriptor(data_dir, history_len)
    path = Path(desc["path"])
    pf = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)  # pre-buffering: ~5x the read memory
    names = pf.schema_arrow.names
    missing = [c for c in _COLUMNS if c not in names]
    if missing:
        raise ValueError(f"{path}: column(s) {missing} missing (columns: {names}), expected {_COLUMNS}; "
                         f"{_FIX}")
    comp = _Compactor(history_len, compact_rows)
    wanted = None
    if only is not None:
        wanted = only.cast(pa.string()) if isinstance(only, pa.Array) else pa.array(list(only), pa.string())
    skipped: dict[str, int] = {}
    rows_read = rows_mine = 0
    kinds = pa.array(list(EVENT_KINDS), pa.string())

    def count(reason: str, n: int) -> None:
        if n:
            skipped[reason] = skipped.get(reason, 0) + int(n)

    for batch in pf.iter_batches(batch_size=batch_rows, columns=_COLUMNS):
        rows_read += batch.num_rows
        users = _plain(batch.column(USER_ID), USER_ID, path)
        enc = pc.dictionary_encode(users)  # hash and route each distinct id once per batch
        dic = enc.dictionary
        mine = np.ones(len(dic), dtype=bool)
        if n_shards is not None:
            mine = (crc32_strings(dic) % np.uint32(n_shards)) == shard_id
        if wanted is not None:
            vs = wanted if wanted.type == dic.type else wanted.cast(dic.type)
            mine &= pc.fill_null(pc.is_in(dic, value_set=vs), False).to_numpy(zero_copy_only=False)
        bad_user = _bad_ids(dic)
        gone = np.zeros(len(dic), dtype=bool)
        if deleted is not None:  # a keyed hash per distinct id of this shard (no unkeyed pre-filter: it would
            cand = np.flatnonzero(mine)  # leak the ids a tombstone stands for)
            ids = dic.take(pa.array(cand)).to_pylist()
            gone[cand] = [uid is not None and deleted(uid) for uid in ids]
            mine &= ~gone
        idx = pc.fill_null(enc.indices, -1).to_numpy(zero_copy_only=False).astype(np.int64)
        if shard_id == 0 or n_shards is None:  # ids that route nowhere: counted once, by shard 0
            count("null_or_bad_user_id", int((idx < 0).sum()) + int(bad_user[idx[idx >= 0]].sum()))
        ok_user = idx >= 0
        count("deleted_user", gone[idx[ok_user]].sum())
        ok_user[ok_user] = mine[idx[ok_user]] & ~bad_user[idx[ok_user]]
        sel = np.flatnonzero(ok_user)
        if not len(sel):
            continue
        rows_mine += len(sel)
        take = pa.array(sel)
        b = batch.take(take)
        items = _plain(b.column(ITEM_ID), ITEM_ID, path)
        ts = pc.cast(b.column(TS), pa.float64()).to_numpy(zero_copy_only=False)
        rating = pc.cast(b.column(RATING), pa.float64()).to_numpy(zero_copy_only=False)
        ev = _plain(b.column(EVENT), EVENT, path)
        ev_code = pc.fill_null(pc.index_in(ev, value_set=kinds), -1).to_numpy(zero_copy_only=False)
        item_null = pc.is_null(items).to_numpy(zero_copy_only=False)
        bad_item = item_null.copy()
        bad_item[~item_null] = _bad_ids(items.filter(pc.invert(pc.is_null(items))))
        no_ts = np.isnan(ts)
        bad_ev = ev_code < 0
        is_rating = ev_code == EVENT_KINDS.index("rating")
        bad_rating = is_rating & ~((rating >= RATING_MIN) & (rating <= RATING_MAX))  # NaN fails both
        count("null_or_bad_item_id", bad_item.sum())
        count("null_ts", (no_ts & ~bad_item).sum())
        count("unknown_event", (bad_ev & ~bad_item & ~no_ts).sum())
        count("rating_missing_or_out_of_range", (bad_rating & ~bad_item & ~no_ts & ~bad_ev).sum())
        good = ~(bad_item | no_ts | bad_ev | bad_rating)
        if not good.all():
            g = pa.array(np.flatnonzero(good))
            b_users, items = users.take(take).take(g), items.take(g)
            ts, rating, ev_code = ts[good], rating[good], ev_code[good]
        else:
            b_users = users.take(take)
        comp.add(b_users, items, ts, rating.astype(np.float32), ev_code.astype(np.int8))

    base = _finish(comp, desc, shard_id, n_shards)
    base.rows_read, base.rows_mine, base.skipped = rows_read, rows_mine, skipped
    base.load_s = time.perf_counter() - t0
    if skipped:
        logger.warning("shard %s: base %s: skipped rows %s (see llmrec.state.base for the rules)", shard_id,
                       path, skipped)
    logger.info("shard %s: base %s: %d users, %d events kept of %d rows read (%d of this shard), %.1f MB "
                "in arrays, %.2fs", shard_id, path, base.n_users, base.n_events, rows_read, rows_mine,
                base.nbytes / 1e6, base.load_s)
    return base


def _finish(comp: _Compactor, desc: dict[str, Any], shard_id: int, n_shards: int | None) -> BaseHistories:
    res = comp.compact(final=True)
    if res is None:
        return BaseHistories.empty(desc, shard_id, n_shards)
    user_keys, starts = res
    r = comp.rows
    items, ts, rating, event = r.items[0], r.ts[0], r.rating[0], r.event[0]
    n_users = len(user_keys)
    n_total = np.diff(starts).astype(np.int64)
    if comp.dropped_users:
        du = np.concatenate(comp.dropped_users)
        np.add.at(n_total, np.searchsorted(user_keys, du), np.concatenate(comp.dropped_counts))
    enc = pc.dictionary_encode(items)
    win_keys = _to_fixed_bytes(enc.dictionary)
    older_u = np.concatenate(comp.older_users) if comp.older_users else None
    older_i = np.concatenate(comp.older_items) if comp.older_items else None
    vocab = np.unique(win_keys if older_i is None else np.concatenate([win_keys, older_i]))  # widths promote
    item_code = np.searchsorted(vocab, win_keys)[enc.indices.to_numpy(zero_copy_only=False)].astype(np.int32)
    older_offsets = older_code = None
    if older_u is not None:
        urow = np.searchsorted(user_keys, older_u).astype(np.int64)
        icode = np.searchsorted(vocab, older_i).astype(np.int64)
        pairs = np.unique(urow * len(vocab) + icode)  # distinct over all compactions, sorted by user
        user_of_row = np.repeat(np.arange(n_users, dtype=np.int64), np.diff(starts))
        in_window = np.unique(user_of_row * len(vocab) + item_code)
        pairs = pairs[~np.isin(pairs, in_window, assume_unique=True)]
        older_code = (pairs % len(vocab)).astype(np.int32)
        per_user = np.bincount(pairs // len(vocab), minlength=n_users)
        older_offsets = np.r_[0, np.cumsum(per_user)].astype(np.int64)
    return BaseHistories(user_keys=user_keys, offsets=starts, item_code=item_code, event_code=event,
                         rating=rating, ts=ts, n_total=n_total.astype(np.int32), item_vocab=vocab,
                         older_offsets=older_offsets, older_code=older_code, descriptor=desc,
                         shard_id=shard_id, n_shards=n_shards)


# --------------------------------------------------------------------------------------------- the arrays


@dataclass
class BaseHistories:
    """The base histories of one shard (array layout in the module docstring); the arrays are read-only
    after loading, only `hidden` grows (users deleted since)."""

    user_keys: np.ndarray
    offsets: np.ndarray
    item_code: np.ndarray
    event_code: np.ndarray
    rating: np.ndarray
    ts: np.ndarray
    n_total: np.ndarray
    item_vocab: np.ndarray
    older_offsets: np.ndarray | None
    older_code: np.ndarray | None
    descriptor: dict[str, Any]
    shard_id: int = 0
    n_shards: int | None = None
    rows_read: int = 0
    rows_mine: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    load_s: float = 0.0
    hidden: set[int] = field(default_factory=set)  # rows of users deleted after loading (the next load skips)

    @classmethod
    def empty(cls, desc: dict[str, Any], shard_id: int = 0, n_shards: int | None = None) -> BaseHistories:
        z64 = np.zeros(1, np.int64)
        return cls(user_keys=np.zeros(0, "S1"), offsets=z64, item_code=np.zeros(0, np.int32),
                   event_code=np.zeros(0, np.int8), rating=np.zeros(0, np.float32), ts=np.zeros(0),
                   n_total=np.zeros(0, np.int32), item_vocab=np.zeros(0, "S1"), older_offsets=None,
                   older_code=None, descriptor=desc, shard_id=shard_id, n_shards=n_shards)

    @property
    def n_users(self) -> int:
        return len(self.user_keys)

    @property
    def n_events(self) -> int:
        """Kept events (the windows), not the file's: see `n_total`."""
        return len(self.item_code)

    @property
    def nbytes(self) -> int:
        arrays = (self.user_keys, self.offsets, self.item_code, self.event_code, self.rating, self.ts,
                  self.n_total, self.item_vocab, self.older_offsets, self.older_code)
        return int(sum(a.nbytes for a in arrays if a is not None))

    def row(self, user_id: str) -> int | None:
        """The user's row, or None when this base does not hold the user (or it was deleted: `hidden`)."""
        if not self.n_users:
            return None
        key = user_id.encode("utf-8", "surrogatepass")
        if len(key) > self.user_keys.dtype.itemsize or not key or key.endswith(b"\0"):
            return None
        r = int(np.searchsorted(self.user_keys, key))
        return r if r < self.n_users and self.user_keys[r] == key and r not in self.hidden else None

    def user_id(self, r: int) -> str:
        return bytes(self.user_keys[r]).decode("utf-8", "surrogatepass")

    def history(self, r: int) -> list[tuple[str, str, float | None, float]]:
        """The user's kept events as `UserState.history` entries (item_id, event, value, ts), oldest first."""
        lo, hi = int(self.offsets[r]), int(self.offsets[r + 1])
        items = [b.decode("utf-8", "surrogatepass") for b in self.item_vocab[self.item_code[lo:hi]].tolist()]
        kinds = [EVENT_KINDS[k] for k in self.event_code[lo:hi].tolist()]
        values = [None if math.isnan(v) else v for v in self.rating[lo:hi].tolist()]
        return list(zip(items, kinds, values, self.ts[lo:hi].tolist(), strict=True))

    def older_items(self, r: int) -> list[str]:
        """Items of the user's events older than the kept window that the window does not hold."""
        if self.older_offsets is None:
            return []
        lo, hi = int(self.older_offsets[r]), int(self.older_offsets[r + 1])
        return [b.decode("utf-8", "surrogatepass") for b in self.item_vocab[self.older_code[lo:hi]].tolist()]

    def state(self, r: int, *, history_len: int) -> UserState:
        """The user's `UserState` as folding `apply_event` over the kept events gives (see the module doc)."""
        return state_from_history(self.user_id(r), self.history(r), n_events=int(self.n_total[r]),
                                  older_seen=self.older_items(r), history_len=history_len)

    def has_event(self, r: int, item_id: str, event: str, ts: float) -> bool:
        """True when the user's kept window holds an event equal on (item_id, event, ts).

        ts is compared in whole seconds (floor), the resolution of the canonical table (`read_events` floors
        logged ts the same way when a log becomes the next run's interactions).
        """
        key = item_id.encode("utf-8", "surrogatepass")
        c = int(np.searchsorted(self.item_vocab, key)) if self.item_vocab.size else 0
        if c >= len(self.item_vocab) or self.item_vocab[c] != key or event not in EVENT_KINDS:
            return False
        lo, hi = int(self.offsets[r]), int(self.offsets[r + 1])
        hit = ((self.item_code[lo:hi] == c) & (self.event_code[lo:hi] == EVENT_KINDS.index(event))
               & (self.ts[lo:hi] == math.floor(ts)))
        return bool(hit.any())

    def info(self) -> dict[str, Any]:
        return {"path": self.descriptor["path"], "n_users": self.n_users, "n_events_kept": self.n_events,
                "n_events_total": int(self.n_total.sum(dtype=np.int64)), "n_items": len(self.item_vocab),
                "nbytes": self.nbytes, "rows_read": self.rows_read, "rows_mine": self.rows_mine,
                "skipped": dict(self.skipped), "load_s": round(self.load_s, 4)}
