"""Durable, segmented, append-only event log (JSONL), one writer per shard, read back by training.

Layout of a log folder (`RUN/events/`)::

    s000-000000000001.jsonl   shard 0, segment whose first record has seq 1
    s000-000000010001.jsonl   shard 0, next segment (a segment holds at most `segment_max_events` records)
    s001-000000000001.jsonl   shard 1 ...
    s000.lock                 held (flock) by the live writer of shard 0
    snapshot-s000.json        written by the store (llmrec.state.store), not by this module

Each line is one JSON object: `{"seq": int, "event_id", "user_id", "item_id", "event", "value", "text",
"text_vec", "ts"}`; `seq` increases by 1 per record within a shard (gaps only where `forget_user` removed
records). `EventLog.append` writes a batch, flushes and `os.fsync`s before returning (one fsync per touched
segment, normally one per call), so an acknowledged event survives a crash of the process or the machine.

Choices (the design leaves them open):

- A writer never appends to a segment an earlier writer left behind: each `EventLog` starts a new segment on
  its first append. A torn last line (a crash mid-write; that event was never acknowledged) therefore stays
  where it is and every reader skips it with a warning and counts it; it never crashes a reader.
- Only one writer per (folder, shard): `EventLog` takes an exclusive `flock` on `sNNN.lock` and raises if
  another live process holds it. The OS drops the lock when the process dies, so a restarted actor gets it.
- `forget_user` rewrites each affected segment to a temporary file, fsyncs it and `os.replace`s it (atomic);
  a segment left empty is deleted. Run it through the live writer (`EventLog.forget_user`, which the store's
  `delete` does) or when no writer is running: a writer keeps its open segment's file handle.
- `read_events` drops duplicate `event_id`s (a retry the store refused can still reach the log when a crash
  falls between the fsync and the reply) and logs how many.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd

from llmrec.schema import EVENT, ITEM_ID, RATING, TS, USER_ID
from llmrec.state.user_state import Event

logger = logging.getLogger(__name__)

__all__ = ["EventLog", "iter_events", "read_events", "forget_user", "segment_paths"]

_SEG_RE = re.compile(r"^s(\d{3,})-(\d{12})\.jsonl$")


def segment_paths(log_dir: str | os.PathLike, shard: int | None = None) -> list[tuple[int, int, Path]]:
    """Segments as (shard, first_seq, path), sorted by shard then first_seq; [] for a missing folder."""
    d = Path(log_dir)
    if not d.is_dir():
        return []
    out = []
    for p in d.iterdir():
        m = _SEG_RE.match(p.name)
        if m and (shard is None or int(m.group(1)) == shard):
            out.append((int(m.group(1)), int(m.group(2)), p))
    return sorted(out)


class EventLog:
    """Append-only writer for one shard of a log folder.

    Args:
        log_dir: the folder (created if missing).
        segment_max_events: records per segment file before a new one starts.
        shard: shard id (names the segment files).
        min_next_seq: the next seq is at least this (the store passes snapshot seq + 1, so seqs never go back
            even when `forget_user` deleted the newest records).

    Example::

        with EventLog(tmp, shard=0) as log:
            log.append([Event(event_id="e1", user_id="u", item_id="i", event="like", ts=1.0)])
            log.last_seq  # 1
    """

    def __init__(self, log_dir: str | os.PathLike, segment_max_events: int = 10000, *, shard: int = 0,
                 min_next_seq: int = 1, lock_timeout_s: float = 10.0) -> None:
        if not isinstance(segment_max_events, int) or segment_max_events < 1:
            raise ValueError(f"segment_max_events must be an int >= 1, got {segment_max_events!r}")
        if not isinstance(shard, int) or shard < 0:
            raise ValueError(f"shard must be an int >= 0, got {shard!r}")
        self.dir = Path(log_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.shard = shard
        self.segment_max_events = segment_max_events
        self._lock_f = self._acquire_lock(lock_timeout_s)
        t0 = time.perf_counter()
        last = _last_seq_on_disk(self.dir, shard)
        self.last_seq = max(last, min_next_seq - 1)  # seq of the newest record written (0 = none yet)
        self._f: IO[str] | None = None
        self._seg_count = 0
        logger.info("event log %s shard %d opened: last seq %d (%.3fs)", self.dir, shard, self.last_seq,
                    time.perf_counter() - t0)

    def append(self, events: Sequence[Event | Mapping[str, Any]]) -> None:
        """Write `events` (each needs an event_id) with consecutive seqs, then flush + fsync before returning.

        After the call `self.last_seq` is the seq of the last event written; the first is
        `last_seq - len(events) + 1`.
        """
        if self._lock_f is None:
            raise ValueError(f"event log {self.dir} shard {self.shard} is closed; open a new EventLog")
        recs = []
        for i, e in enumerate(events):
            ev = e if isinstance(e, Event) else Event.from_dict(e)
            if not ev.event_id:
                raise ValueError(
                    f"events[{i}] has no event_id; the log needs one per event (the store assigns it)"
                )
            recs.append(ev.to_dict())
        if not recs:
            return
        seq = self.last_seq
        pos = 0
        while pos < len(recs):
            if self._f is None or self._seg_count >= self.segment_max_events:
                self._open_segment(seq + 1)
            room = self.segment_max_events - self._seg_count
            chunk = recs[pos: pos + room]
            lines = []
            for r in chunk:
                seq += 1
                lines.append(json.dumps({"seq": seq, **r}, separators=(",", ":"), allow_nan=False))
            self._f.write("\n".join(lines) + "\n")
            self._f.flush()
            os.fsync(self._f.fileno())
            self._seg_count += len(chunk)
            pos += len(chunk)
        self.last_seq = seq

    def forget_user(self, user_id: str, max_seq: int | None = None) -> int:
        """Remove the records of `user_id` (with seq <= max_seq, if given) from this shard's segments;
        returns how many were removed."""
        self._close_segment()
        return forget_user(self.dir, user_id, shard=self.shard, max_seq=max_seq)

    def close(self) -> None:
        self._close_segment()
        if self._lock_f is not None:
            fcntl.flock(self._lock_f, fcntl.LOCK_UN)
            self._lock_f.close()
            self._lock_f = None

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _acquire_lock(self, timeout_s: float) -> IO[str]:
        path = self.dir / f"s{self.shard:03d}.lock"
        f = open(path, "a")
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return f
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    f.close()
                    raise ValueError(
                        f"event log {self.dir} shard {self.shard} is locked by another writer ({path}); "
                        "only one EventLog (one store shard actor) may write a shard: stop the other one"
                    ) from None
                time.sleep(0.05)

    def _open_segment(self, first_seq: int) -> None:
        self._close_segment()
        path = self.dir / f"s{self.shard:03d}-{first_seq:012d}.jsonl"
        if path.exists():
            if any(rec is not None for rec in _read_segment(path, self.shard)):
                raise ValueError(
                    f"segment {path} already exists with records; the log folder is inconsistent "
                    "(two writers?)"
                )
            # a crash right after creating it: the file holds nothing or only a torn (never acknowledged) line
            logger.warning("replacing segment %s that holds no complete record (%d bytes)", path,
                           path.stat().st_size)
            path.unlink()
        self._f = open(path, "x", encoding="utf-8")
        self._seg_count = 0
        _fsync_dir(self.dir)  # make the new file's directory entry durable too

    def _close_segment(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def iter_events(log_dir: str | os.PathLike, shard: int | None = None, after_seq: int | None = None,
                *, counters: dict[str, int] | None = None) -> Iterator[dict[str, Any]]:
    """Yield log records (dicts with `shard`, `seq` and the event fields) in (shard, seq) order.

    Args:
        shard: only this shard; None = all shards.
        after_seq: only records with seq > after_seq (per shard).
        counters: if given, `counters["torn"]` is increased by the number of unreadable lines skipped and
            `counters["records"]` by the number yielded.
    """
    segs = segment_paths(log_dir, shard)
    torn = n = 0
    for k, (sh, first, path) in enumerate(segs):
        nxt = segs[k + 1] if k + 1 < len(segs) else None
        if after_seq is not None and nxt is not None and nxt[0] == sh and nxt[1] <= after_seq + 1:
            continue  # the whole segment is at or before after_seq
        for rec in _read_segment(path, sh):
            if rec is None:
                torn += 1
                continue
            if after_seq is not None and rec["seq"] <= after_seq:
                continue
            n += 1
            yield rec
    if torn:
        logger.warning("event log %s: skipped %d torn/unreadable line(s) (a crash mid-write; those events "
                       "were never acknowledged)", log_dir, torn)
    if counters is not None:
        counters["torn"] = counters.get("torn", 0) + torn
        counters["records"] = counters.get("records", 0) + n


def read_events(log_dir: str | os.PathLike) -> pd.DataFrame:
    """The logged item events as a canonical interactions table, sorted by ts (stable).

    Returns:
        DataFrame with columns user_id (str), item_id (str), ts (int64, unix s floored), rating (float64,
        the value of `rating` events, else NaN), event (str). Text-only events (no item) are left out and
        counted in a log line; duplicate event_ids are kept once.
    """
    t0 = time.perf_counter()
    rows: dict[str, list] = {USER_ID: [], ITEM_ID: [], TS: [], RATING: [], EVENT: []}
    seen_ids: set[str] = set()
    n_text = n_dup = 0
    counters: dict[str, int] = {}
    for rec in iter_events(log_dir, counters=counters):
        eid = rec.get("event_id")
        if eid is not None:
            if eid in seen_ids:
                n_dup += 1
                continue
            seen_ids.add(eid)
        if rec.get("item_id") is None:
            n_text += 1
            continue
        rows[USER_ID].append(rec["user_id"])
        rows[ITEM_ID].append(rec["item_id"])
        rows[TS].append(int(np.floor(rec["ts"])))
        rows[RATING].append(rec["value"] if rec["event"] == "rating" and rec["value"] is not None else np.nan)
        rows[EVENT].append(rec["event"])
    df = pd.DataFrame({
        USER_ID: pd.Series(rows[USER_ID], dtype=object).astype(str),
        ITEM_ID: pd.Series(rows[ITEM_ID], dtype=object).astype(str),
        TS: pd.Series(rows[TS], dtype="int64"),
        RATING: pd.Series(rows[RATING], dtype="float64"),
        EVENT: pd.Series(rows[EVENT], dtype=object).astype(str),
    })
    df = df.sort_values(TS, kind="stable").reset_index(drop=True)
    logger.info("read %d item events from %s (%d text-only events left out, %d duplicate ids dropped, "
                "%d torn lines skipped) in %.2fs", len(df), log_dir, n_text, n_dup, counters.get("torn", 0),
                time.perf_counter() - t0)
    return df


def forget_user(log_dir: str | os.PathLike, user_id: str, shard: int | None = None,
                max_seq: int | None = None) -> int:
    """Delete every logged event of `user_id` (atomic rewrite per segment); returns how many were removed.

    With `max_seq`, only records with seq <= max_seq go (the store finishes a delete that a crash
    interrupted without touching the user's later events).

    Do not call this on a shard with a live writer from outside it; use `EventLog.forget_user` there.
    Torn lines in rewritten segments are dropped (they were never acknowledged).
    """
    if not isinstance(user_id, str) or not user_id:
        raise ValueError(f"user_id must be a non-empty string, got {user_id!r}")
    removed = 0
    t0 = time.perf_counter()
    for sh, _first, path in segment_paths(log_dir, shard):
        keep: list[str] = []
        hit = 0
        with open(path, encoding="utf-8") as f:
            for line in f:
                rec = _parse(line)
                if rec is None:
                    continue
                if rec.get("user_id") == user_id and (max_seq is None or rec["seq"] <= max_seq):
                    hit += 1
                else:
                    keep.append(line if line.endswith("\n") else line + "\n")
        if not hit:
            continue
        removed += hit
        if keep:
            tmp = path.with_name(path.name + ".tmp")
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(keep)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:
            path.unlink()
        _fsync_dir(path.parent)
    logger.info("forgot user %r: removed %d logged event(s) from %s in %.2fs", user_id, removed, log_dir,
                time.perf_counter() - t0)
    return removed


def _parse(line: str) -> dict[str, Any] | None:
    if not line.endswith("\n"):
        return None  # torn: the writer died before finishing the line
    try:
        rec = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(rec, dict) or not isinstance(rec.get("seq"), int) or "user_id" not in rec:
        return None
    return rec


def _read_segment(path: Path, shard: int) -> Iterator[dict[str, Any] | None]:
    """Records of one segment; None for each torn/unreadable line. A segment deleted meanwhile is empty."""
    try:
        f = open(path, encoding="utf-8")
    except FileNotFoundError:
        return
    with f:
        for line in f:
            if not line.strip():
                continue
            rec = _parse(line)
            if rec is not None:
                rec["shard"] = shard
            yield rec


def _last_seq_on_disk(log_dir: Path, shard: int) -> int:
    for _sh, _first, path in reversed(segment_paths(log_dir, shard)):
        last = 0
        for rec in _read_segment(path, shard):
            if rec is not None:
                last = max(last, rec["seq"])
        if last:
            return last
    return 0


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
