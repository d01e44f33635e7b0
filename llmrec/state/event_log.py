"""Durable, segmented, append-only event log (JSONL with a checksum per record), one writer per shard.

Layout of a log folder (`RUN/events/`)::

    s000-000000000001.jsonl   shard 0, segment whose first record has seq 1
    s000-000000010001.jsonl   shard 0, next segment (a new one starts once a segment holds
                              `segment_max_events` records; a batch is never split across segments)
    s001-000000000001.jsonl   shard 1 ...
    s000.lock                 held (flock) by the live writer of shard 0
    s000.purge.lock           held (flock) while a purge rewrites or retirement deletes shard 0's segments
    snapshot-s000.json        written by the store (llmrec.state.store), not by this module

Each line is one JSON object, one event::

    {"seq":7,"bn":0,"event_id":"...","user_id":"u1","item_id":"i9","event":"like","ts":1700000000.5,
     "crc":"1a2b3c4d"}

- `seq` increases by 1 per record within a shard (gaps only where `forget_user` removed records).
- `bn` is the number of records of the same `append` call after this one: a batch is complete when its
  record with `bn` 0 is there. A batch whose end is missing (a crash mid-write) was never acknowledged and
  is dropped as a whole, so a client never sees part of a refused batch come back.
- `crc` is the zlib.crc32 (8 hex digits) of the line's bytes up to `,"crc":` followed by `}`; a record whose
  checksum does not match is damaged.
- Fields that are null are left out; `text_vec` is stored as base64 of little-endian float32 (a 384-d
  vector: 2,048 characters instead of ~7,500 as JSON numbers; the store rounds vectors to float32 before it
  applies them, so a replay gives exactly the live state).
- Lines written before checksums existed (no `crc`, no `bn`) are still read, each as a batch of one.

Durability and failure rules:

- `append` writes the whole batch with one `os.write` loop on a raw descriptor and `os.fsync`s before it
  returns: an acknowledged event survives a crash of the process or the machine. If the write or the fsync
  fails (ENOSPC, EIO), the segment is truncated back to where the batch started and fsync'd, the sequence
  number does not advance, and `LogWriteError` (a `StateUnavailable`: a server fault, never a client
  error) is raised. If even the truncation fails, the writer closes the segment and repairs it (cuts every
  record after the last acknowledged seq) before its next append.
- A writer never appends to a segment an earlier writer left behind: each `EventLog` starts a new segment on
  its first append, after cutting the torn tail (an incomplete line, a bad checksum, an incomplete batch) of
  the shard's last segment, which only a crash mid-write can leave. So only the last segment of a shard may
  end torn (while its writer is dead, or mid-write); readers skip and count such a tail. A damaged record
  anywhere else (a bad checksum or an incomplete batch in the middle of a segment or at the end of an
  earlier segment) stops every reader with `LogCorruption`, naming the file and byte offset: recovery must
  not silently lose acknowledged events. (Segments written before checksums keep the old rule: a torn last
  line of any segment is skipped.)
- Only one writer per (folder, shard): `EventLog` takes an exclusive `flock` on `sNNN.lock` and raises if
  another live process holds it. The OS drops the lock when the process dies, so a restarted actor gets it.
- `forget_user` rewrites each affected segment to a temporary file, fsyncs it and `os.replace`s it (atomic),
  re-framing the batches it shortened; a segment left empty is deleted. It finds the users' records with a
  pattern scan of the raw bytes and decodes only the batches that hold them, so a purge pass costs about a
  regular-expression pass over the log, not a JSON decode of every record. Run it through the live writer
  (`EventLog.forget_user`) or when no writer is running.
- `EventLog.retire` deletes whole segments that a snapshot covers and that are older than a retention
  horizon (the store's `log_retention_s`): the log's retention.
- `read_events` drops duplicate (user_id, event_id) pairs (a retry the store refused can still reach the log
  when a crash falls between the fsync and the reply) and logs how many.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import logging
import os
import re
import threading
import time
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from llmrec.artifacts import atomic_write, fsync_dir
from llmrec.schema import EVENT, ITEM_ID, RATING, TS, USER_ID
from llmrec.state.errors import LogCorruption, LogWriteError
from llmrec.state.purge_worker import PurgeWorker
from llmrec.state.user_state import Event

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)

__all__ = ["EventLog", "iter_events", "read_events", "forget_user", "segment_paths", "encode_record"]

_SEG_RE = re.compile(r"^s(\d{3,})-(\d{12})\.jsonl$")
_CRC_RE = re.compile(rb',"crc":"([0-9a-f]{8})"\}\n\Z')
_FILE_MODE = 0o600  # the log holds user ids: readable by the serving user only


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


def encode_record(seq: int, bn: int, event: Mapping[str, Any]) -> bytes:
    """One log line (bytes, ending in a newline) for `event` (an `Event.to_dict()`), with seq, bn and crc."""
    rec: dict[str, Any] = {"seq": int(seq), "bn": int(bn)}
    for k, v in event.items():
        if v is None or k in ("seq", "bn", "crc", "shard"):
            continue
        if k == "text_vec":
            v = base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode("ascii")
        rec[k] = v
    payload = json.dumps(rec, separators=(",", ":"), allow_nan=False).encode("utf-8", "surrogatepass")
    return payload[:-1] + b',"crc":"%08x"}\n' % zlib.crc32(payload)


class EventLog:
    """Append-only writer for one shard of a log folder (thread-safe: one lock around every file change).

    Args:
        log_dir: the folder (created if missing).
        segment_max_events: records per segment file before a new one starts (checked between batches).
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
        self._mutex = threading.RLock()
        self._lock_f = self._acquire_lock(lock_timeout_s)
        t0 = time.perf_counter()
        last = _repair_last_segment(self.dir, shard)
        self.last_seq = max(last, min_next_seq - 1)  # seq of the newest acknowledged record (0 = none yet)
        self._fd: int | None = None
        self._path: Path | None = None
        self._size = 0
        self._seg_count = 0
        self._needs_repair = False
        self._purger = PurgeWorker({"kind": "file", "dir": str(self.dir)})  # started on the first purge
        logger.info("event log %s shard %d opened: last seq %d (%.3fs)", self.dir, shard, self.last_seq,
                    time.perf_counter() - t0)

    def append(self, events: Sequence[Event | Mapping[str, Any]]) -> None:
        """Write `events` (each needs an event_id) with consecutive seqs, then fsync before returning.

        After the call `self.last_seq` is the seq of the last event written; the first is
        `last_seq - len(events) + 1`.

        Raises:
            ValueError: an event without event_id (nothing written).
            LogWriteError: the write or fsync failed; nothing of the batch stays in the log.
        """
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
        with self._mutex:
            if self._lock_f is None:
                raise ValueError(f"event log {self.dir} shard {self.shard} is closed; open a new EventLog")
            try:
                if self._needs_repair:
                    self._repair()
                if self._fd is None or self._seg_count >= self.segment_max_events:
                    self._open_segment(self.last_seq + 1)
            except OSError as e:
                raise LogWriteError(f"event log {self.dir} shard {self.shard}: cannot open a segment "
                                    f"({type(e).__name__}: {e}); nothing was written") from e
            data = b"".join(encode_record(self.last_seq + 1 + k, len(recs) - 1 - k, r)
                            for k, r in enumerate(recs))
            pos = self._size
            try:
                _write_all(self._fd, data)
                os.fsync(self._fd)
            except OSError as e:
                self._roll_back(pos)
                raise LogWriteError(f"event log {self._path}: appending {len(recs)} event(s) failed "
                                    f"({type(e).__name__}: {e}); the batch was rolled back, nothing was "
                                    "acknowledged") from e
            self._size += len(data)
            self._seg_count += len(recs)
            self.last_seq += len(recs)

    def rotate(self) -> None:
        """Close the open segment (the next append starts a new one): closed segments can be rewritten."""
        with self._mutex:
            self._close_segment()

    def forget_user(self, user_id: str, max_seq: int | None = None) -> int:
        """Remove the records of `user_id` (with seq <= max_seq, if given) from this shard's segments;
        returns how many were removed."""
        with self._mutex:
            self._close_segment()
            return forget_user(self.dir, user_id, shard=self.shard, max_seq=max_seq)

    def forget_users(self, user_ids: Mapping[str, int | None]) -> int:
        """`forget_user` for many users in one pass over the segments: {user_id: max_seq or None}.

        Only the segment switch holds the writer's lock: the rewrite covers the segments closed at that
        moment (every record up to `last_seq`), so appends go on meanwhile in a new segment. The scan and
        rewrite run in this log's purge worker, a child process (`llmrec.state.purge_worker`): the caller
        waits on a pipe, and the shard's other threads keep the GIL."""
        with self._mutex:
            self._close_segment()
            upto = self.last_seq
        return self._purger.forget(self.shard, user_ids, upto)

    def purge_worker_stats(self) -> dict[str, Any]:
        """{"pid", "jobs", "in_process", "starts"} of this log's purge worker."""
        return self._purger.stats()

    def retire(self, upto_seq: int, older_than_s: float) -> list[Path]:
        """Delete closed segments whose records all have seq <= upto_seq (a snapshot holds their effect) and
        that were last written more than `older_than_s` seconds ago. Returns the deleted paths."""
        with self._mutex, _purge_lock(self.dir, self.shard):  # never beside a rewrite of the same segments
            segs = segment_paths(self.dir, self.shard)
            now = time.time()
            gone = []
            for (_sh, _first, path), nxt in zip(segs, segs[1:], strict=False):  # never the last segment
                if path == self._path or nxt[1] - 1 > upto_seq:
                    continue
                try:
                    if now - path.stat().st_mtime < older_than_s:
                        continue
                    path.unlink()
                except FileNotFoundError:
                    continue
                gone.append(path)
            if gone:
                fsync_dir(self.dir)
                logger.info("event log %s shard %d: retired %d segment(s) up to seq %d", self.dir,
                            self.shard, len(gone), upto_seq)
            return gone

    def close(self) -> None:
        self._purger.close()
        with self._mutex:
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
            if any(st in ("ok", "old") for _o, _e, st, _r in _scan(path)):
                raise LogCorruption(
                    f"segment {path} already exists with records; the log folder is inconsistent "
                    "(two writers, or a snapshot seq behind the files?)"
                )
            # a crash right after creating it: the file holds nothing or only a torn (never acknowledged) line
            logger.warning("replacing segment %s that holds no complete record (%d bytes)", path,
                           path.stat().st_size)
            path.unlink()
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, _FILE_MODE)
        self._path = path
        self._size = 0
        self._seg_count = 0
        fsync_dir(self.dir)  # make the new file's directory entry durable too

    def _roll_back(self, pos: int) -> None:
        """Cut a failed batch off the open segment; if that fails too, repair before the next append."""
        try:
            os.ftruncate(self._fd, pos)
            os.fsync(self._fd)
        except OSError:
            logger.exception("event log %s: could not truncate a failed batch; the segment will be repaired "
                             "before the next append", self._path)
            self._needs_repair = True
            self._close_segment()

    def _repair(self) -> None:
        """Cut every record after the last acknowledged seq from the shard's last segment (a failed append
        whose roll-back failed), then continue in a new segment."""
        _repair_last_segment(self.dir, self.shard, keep_upto_seq=self.last_seq)
        self._needs_repair = False

    def _close_segment(self) -> None:
        fd, self._fd, self._path = self._fd, None, None  # forget it first: a failed close must not stick
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                logger.warning("event log %s shard %d: closing a segment failed (its records were fsync'd "
                               "already)", self.dir, self.shard, exc_info=True)


def iter_events(log_dir: str | os.PathLike, shard: int | None = None, after_seq: int | None = None,
                *, counters: dict[str, int] | None = None) -> Iterator[dict[str, Any]]:
    """Yield log records (dicts with `shard`, `seq` and the event fields; null fields absent) in (shard, seq)
    order, only from complete batches.

    Args:
        shard: only this shard; None = all shards.
        after_seq: only records with seq > after_seq (per shard).
        counters: if given, `counters["torn"]` is increased by the number of torn records skipped (a crash
            mid-write: never acknowledged) and `counters["records"]` by the number yielded.

    Raises:
        LogCorruption: a damaged record that is not the torn tail of a shard's last segment.
    """
    segs = segment_paths(log_dir, shard)
    torn = n = 0
    for k, (sh, _first, path) in enumerate(segs):
        nxt = segs[k + 1] if k + 1 < len(segs) else None
        if after_seq is not None and nxt is not None and nxt[0] == sh and nxt[1] <= after_seq + 1:
            continue  # the whole segment is at or before after_seq
        last_of_shard = nxt is None or nxt[0] != sh
        seg_torn = 0
        for rec in _complete_records(path, last_of_shard):
            if rec is None:
                seg_torn += 1
                continue
            if after_seq is not None and rec["seq"] <= after_seq:
                continue
            rec["shard"] = sh
            n += 1
            yield rec
        torn += seg_torn
    if torn:
        logger.warning("event log %s: skipped %d torn record(s) at a segment's end (a crash mid-write; those "
                       "events were never acknowledged)", log_dir, torn)
    if counters is not None:
        counters["torn"] = counters.get("torn", 0) + torn
        counters["records"] = counters.get("records", 0) + n


def read_events(log_dir: str | os.PathLike) -> pd.DataFrame:
    """The logged item events as a canonical interactions table, sorted by ts (stable).

    Returns:
        DataFrame with columns user_id (str), item_id (str), ts (int64, unix s floored), rating (float64,
        the value of `rating` events, else NaN), event (str). Text-only events (no item) are left out and
        counted in a log line; a repeated (user_id, event_id) pair is kept once (event ids are unique per
        user, as the store dedups them: two users may share one).
    """
    t0 = time.perf_counter()
    rows: dict[str, list] = {USER_ID: [], ITEM_ID: [], TS: [], RATING: [], EVENT: []}
    seen_ids: set[tuple[str, str]] = set()
    n_text = n_dup = 0
    counters: dict[str, int] = {}
    for rec in iter_events(log_dir, counters=counters):
        eid = rec.get("event_id")
        if eid is not None:
            key = (rec["user_id"], eid)
            if key in seen_ids:
                n_dup += 1
                continue
            seen_ids.add(key)
        if rec.get("item_id") is None:
            n_text += 1
            continue
        rows[USER_ID].append(rec["user_id"])
        rows[ITEM_ID].append(rec["item_id"])
        rows[TS].append(int(np.floor(rec["ts"])))
        value = rec.get("value")
        rows[RATING].append(value if rec["event"] == "rating" and value is not None else np.nan)
        rows[EVENT].append(rec["event"])
    import pandas as pd  # here, not at the top: the purge worker imports this module and needs no pandas

    df = pd.DataFrame({
        USER_ID: pd.Series(rows[USER_ID], dtype=object).astype(str),
        ITEM_ID: pd.Series(rows[ITEM_ID], dtype=object).astype(str),
        TS: pd.Series(rows[TS], dtype="int64"),
        RATING: pd.Series(rows[RATING], dtype="float64"),
        EVENT: pd.Series(rows[EVENT], dtype=object).astype(str),
    })
    df = df.sort_values(TS, kind="stable").reset_index(drop=True)
    logger.info("read %d item events from %s (%d text-only events left out, %d duplicate ids dropped, "
                "%d torn records skipped) in %.2fs", len(df), log_dir, n_text, n_dup, counters.get("torn", 0),
                time.perf_counter() - t0)
    return df


def forget_user(log_dir: str | os.PathLike, user_id: str, shard: int | None = None,
                max_seq: int | None = None) -> int:
    """Delete every logged event of `user_id` (atomic rewrite per segment); returns how many were removed.

    With `max_seq`, only records with seq <= max_seq go (the store finishes a delete that a crash
    interrupted without touching the user's later events).

    Do not call this on a shard with a live writer from outside it; use `EventLog.forget_user` there.
    Torn records at the end of rewritten segments are dropped (they were never acknowledged).
    """
    if not isinstance(user_id, str) or not user_id:
        raise ValueError(f"user_id must be a non-empty string, got {user_id!r}")
    t0 = time.perf_counter()
    shards = sorted({sh for sh, _f, _p in segment_paths(log_dir, shard)})
    removed = sum(_rewrite_without(Path(log_dir), sh, {user_id: max_seq}) for sh in shards)
    # the id itself is not logged: deletes are privacy requests
    logger.info("forgot a user: removed %d logged event(s) from %s in %.2fs", removed, log_dir,
                time.perf_counter() - t0)
    return removed


# ----------------------------------------------------------------------------------------------- internals


def _rewrite_without(log_dir: Path, shard: int, users: Mapping[str, int | None],
                     max_first_seq: int | None = None, *, fast: bool = True) -> int:
    """Rewrite this shard's segments without the records of `users` ({user_id: max_seq or None}); with
    `max_first_seq`, only segments that start at or before it (closed ones: a writer may append to newer).

    A segment whose bytes name none of the users is left as it is, and in one that does only the batches
    holding their records are decoded and re-framed; the other lines are copied as they are
    (`_drop_users`). So a pass costs a regular-expression scan of the log plus the work on the users'
    own batches, not a JSON decode and re-encode of every record (seconds per 100k events, each time a
    shard purges its deletes). Segments that are not plain checksummed batches take the careful path
    (`_drop_users_careful`; `fast=False`: every segment, the reference of the tests and benchmarks)."""
    with _purge_lock(log_dir, shard):
        return _rewrite_locked(log_dir, shard, users, max_first_seq, fast)


@contextlib.contextmanager
def _purge_lock(log_dir: Path, shard: int) -> Iterator[None]:
    """Held (flock) while one of the shard's segments is rewritten or retired: a purge worker that a killed
    shard left running finishes its job before a restarted shard touches the same segments."""
    with open(Path(log_dir) / f"s{shard:03d}.purge.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _rewrite_locked(log_dir: Path, shard: int, users: Mapping[str, int | None], max_first_seq: int | None,
                    fast: bool) -> int:
    removed = 0
    tokens = user_tokens(users)
    segs = segment_paths(log_dir, shard)
    for k, (_sh, first, path) in enumerate(segs):
        if max_first_seq is not None and first > max_first_seq:
            continue
        quick = None
        if fast:
            try:
                quick = _drop_users(path.read_bytes(), users, tokens)
            except FileNotFoundError:
                continue  # a concurrent retire
        if quick is not None:
            out_data, n = quick
            if not n:
                continue
        else:
            out_data, n = _drop_users_careful(path, k == len(segs) - 1, users)
            if out_data is None:
                continue
        removed += n
        if out_data:
            atomic_write(path, lambda tmp, data=out_data: tmp.write_bytes(data), durable=True,
                         mode=_FILE_MODE)
        else:
            path.unlink()
            fsync_dir(path.parent)
    return removed


# the head every checksummed record starts with, and its user id as a JSON string token. Inside a JSON
# string every quote is escaped, so `"user_id":"` is only ever the key itself in a record of ours (flat, with
# fixed keys); the string pattern is unrolled (no alternation per character): ~250 MB/s
_HEAD_RE = re.compile(rb'\{"seq":(\d+),"bn":(\d+),')
_UID_RE = re.compile(rb'"user_id":("[^"\\\n]*(?:\\.[^"\\\n]*)*")')


def user_tokens(users: Mapping[str, int | None]) -> dict[bytes, int | None]:
    """{each user id as `encode_record` writes it (a JSON string token): its value in `users`}."""
    return {json.dumps(u).encode("utf-8", "surrogatepass"): m for u, m in users.items()}


def record_user_token(line: bytes) -> bytes | None:
    """The user id token of one checksummed record's line (compare with `user_tokens`); None when the line
    does not have the layout `encode_record` writes (decode it then)."""
    if not _HEAD_RE.match(line):
        return None
    m = _UID_RE.search(line)
    return None if m is None else m.group(1)


def forgets(users: Mapping[str, int | None], rec: Mapping[str, Any]) -> bool:
    """True when a purge of `users` ({user_id: max_seq or None}) removes this decoded record."""
    uid = rec.get("user_id")
    return uid in users and (users[uid] is None or rec["seq"] <= users[uid])


def _drop_users(data: bytes, users: Mapping[str, int | None], tokens: Mapping[bytes, int | None]
                ) -> tuple[bytes, int] | None:
    """(the segment without the users' records, how many went) for a segment of complete checksummed
    batches; None when it is anything else (a torn tail, old lines without checksums, a damaged head or
    batch around one of the users' records, a damaged record in a batch to re-frame): the careful path
    decides then.

    Only the users' own batches are read record by record: the user id tokens of all records are read off
    the bytes by one pattern scan (one per line), a record of theirs marks its batch (the run of lines
    around it whose `bn` counts down to 0), and every other byte is copied as it is. `tokens`:
    `user_tokens(users)`."""
    newlines = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 10)
    if not data.endswith(b"\n") or len(newlines) != data.count(b',"crc":"'):
        return None  # a torn or blank line, or lines from before checksums (written in another layout)
    toks = _UID_RE.findall(data)  # one per line: every checksummed record's id is found by the pattern
    if len(toks) != len(newlines):
        return None
    hit = [i for i, t in enumerate(toks) if t in tokens]
    if not hit:
        return data, 0  # none of them here
    batches: dict[int, int] = {}  # start offset -> end offset of each batch holding one of their records
    end = 0
    for i in hit:
        line = 0 if i == 0 else int(newlines[i - 1]) + 1
        if line < end:
            continue  # in the batch just taken
        span = _batch_around(data, line)
        if span is None:
            return None
        batches[span[0]] = end = span[1]
    out: list[bytes] = []
    removed = pos = 0
    for b0 in sorted(batches):
        b1 = batches[b0]
        out.append(data[pos:b0])
        kept = []
        for line in data[b0:b1].splitlines(keepends=True):  # re-frame the kept records (checksums checked)
            status, rec = _decode(line)
            if status != "ok" or rec is None:
                return None
            if forgets(users, rec):
                removed += 1
            else:
                kept.append(rec)
        out.extend(encode_record(r["seq"], len(kept) - 1 - j, r) for j, r in enumerate(kept))
        pos = b1
    out.append(data[pos:])
    return b"".join(out), removed


def _batch_around(data: bytes, line: int) -> tuple[int, int] | None:
    """(start, end) offsets of the batch holding the line that starts at `line`: earlier lines while their
    `bn` is one more than the next one's, then `bn` more lines. None when a head does not parse or the
    countdown breaks (the careful path raises on the damage)."""
    head = _HEAD_RE.match(data, line)
    if head is None:
        return None
    bn = int(head.group(2))
    start = line
    while start > 0:  # walk back to the batch's first line
        prev = data.rfind(b"\n", 0, start - 1) + 1
        h = _HEAD_RE.match(data, prev)
        if h is None:
            return None
        pbn = int(h.group(2))
        if pbn == 0:
            break
        if pbn != bn + 1:
            return None
        start, bn = prev, pbn
    end = line
    want = int(head.group(2))
    while True:  # and forward to its last (bn 0)
        h = _HEAD_RE.match(data, end)
        if h is None or int(h.group(2)) != want:
            return None
        end = data.index(b"\n", end) + 1
        if want == 0:
            return start, end
        want -= 1


def _drop_users_careful(path: Path, last_of_shard: bool, users: Mapping[str, int | None]
                        ) -> tuple[bytes | None, int]:
    """Every record decoded and checked (`_complete_records`: damage raises `LogCorruption`, a torn tail of
    the shard's last segment goes too, it was never acknowledged); (None, 0) when nothing changes."""
    out: list[bytes] = []
    hit = removed = 0
    batch: list[dict[str, Any]] = []
    for rec in _complete_records(path, last_of_shard, with_bn=True):
        if rec is None:
            hit += 1
            continue
        drop = forgets(users, rec)
        hit += drop
        removed += drop
        bn = rec.pop("bn")
        if not drop:
            batch.append(rec)
        if bn == 0:  # re-frame the batch's kept records
            out.extend(encode_record(r["seq"], len(batch) - 1 - j, r) for j, r in enumerate(batch))
            batch = []
    return (b"".join(out) if hit else None), removed


def _decode(line: bytes) -> tuple[str, dict[str, Any] | None]:
    """("ok", record) for a checksummed line, ("old", record) for a line written before checksums (bn 0),
    ("bad", None) for a damaged or torn line."""
    if not line.endswith(b"\n"):
        return "bad", None  # torn: the writer died before finishing the line
    m = _CRC_RE.search(line)
    try:
        if m is not None:
            payload = line[: m.start()] + b"}"
            if zlib.crc32(payload) != int(m.group(1), 16):
                return "bad", None
            rec = json.loads(payload)
            if not isinstance(rec, dict) or not isinstance(rec.get("bn"), int) or rec["bn"] < 0:
                return "bad", None
            status = "ok"
        else:  # a record written before checksums (one event per line)
            rec = json.loads(line)
            if not isinstance(rec, dict) or "crc" in rec or "bn" in rec:
                return "bad", None
            rec["bn"] = 0
            status = "old"
    except (ValueError, UnicodeDecodeError):
        return "bad", None
    if not isinstance(rec.get("seq"), int) or not isinstance(rec.get("user_id"), str):
        return "bad", None
    tv = rec.get("text_vec")
    if isinstance(tv, str):
        try:
            rec["text_vec"] = np.frombuffer(base64.b64decode(tv, validate=True), dtype="<f4").tolist()
        except ValueError:
            return "bad", None
    return status, rec


def _scan(path: Path) -> Iterator[tuple[int, int, str, dict[str, Any] | None]]:
    """(start offset, end offset, "ok"|"old"|"bad"|"blank", record) per line of a segment; a vanished file
    is empty (a concurrent forget or retire)."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return
    with f:
        off = 0
        for line in f:
            end = off + len(line)
            if not line.strip():
                yield off, end, "blank", None
            else:
                status, rec = _decode(line)
                yield off, end, status, rec
            off = end


def _complete_records(path: Path, last_of_shard: bool, *, with_bn: bool = False
                      ) -> Iterator[dict[str, Any] | None]:
    """Records of complete batches, in order; one None per torn record of the segment's tail.

    A damaged line or an incomplete batch is a torn tail only at the end of the shard's last segment (or, for
    a segment without checksums, at the end of any segment); anywhere else `LogCorruption` is raised.
    """
    pending: list[dict[str, Any]] = []
    bad: tuple[int, int] | None = None  # (line number, offset) of the first damaged line
    legacy = False
    n_bad = 0
    for lineno, (off, _end, status, rec) in enumerate(_scan(path), start=1):
        if status == "blank":
            continue
        if status == "bad":
            bad = bad or (lineno, off)
            n_bad += 1
            continue
        if bad is not None:
            raise _corrupt(path, *bad, "a damaged record (bad checksum or unparsable) is followed by valid "
                                       "records")
        assert rec is not None
        legacy = legacy or status == "old"
        if pending and rec["bn"] != pending[-1]["bn"] - 1:
            raise _corrupt(path, lineno, off, f"record seq {rec['seq']} breaks the batch of seq "
                                              f"{pending[0]['seq']} (expected bn {pending[-1]['bn'] - 1}, "
                                              f"got {rec['bn']})")
        pending.append(rec)
        if rec["bn"] == 0:
            for r in pending:
                if not with_bn:
                    r.pop("bn", None)
                yield r
            pending = []
    if bad is None and not pending:
        return
    if not (last_of_shard or (legacy and not pending)):
        where = bad or (0, 0)
        raise _corrupt(path, where[0], where[1], f"{n_bad} damaged record(s) / an incomplete batch of "
                                                 f"{len(pending)} record(s) at the end of a segment that is "
                                                 "not the shard's last")
    for _ in range(n_bad + len(pending)):
        yield None


def _corrupt(path: Path, lineno: int, off: int, what: str) -> LogCorruption:
    return LogCorruption(
        f"event log segment {path}, line {lineno} (byte {off}): {what}. Acknowledged events may be damaged; "
        "recovery stopped instead of skipping them. Restore the segment from a backup, or move it out of "
        "the folder to accept losing its events, then restart"
    )


def _repair_last_segment(log_dir: Path, shard: int, keep_upto_seq: int | None = None) -> int:
    """Cut the torn tail (and, with keep_upto_seq, every record after it) off the shard's last segment,
    deleting segments left empty; returns the last seq that remains in the shard (0 = none)."""
    while True:
        segs = segment_paths(log_dir, shard)
        if not segs:
            return 0
        path = segs[-1][2]
        good_end, last = 0, 0
        bad_off: int | None = None
        for off, end, status, rec in _scan(path):
            if status == "blank":
                continue
            if status == "bad":
                bad_off = off if bad_off is None else bad_off
                continue
            if bad_off is not None:
                raise _corrupt(path, 0, bad_off, "a damaged record is followed by valid records")
            assert rec is not None
            if keep_upto_seq is not None and rec["seq"] > keep_upto_seq:
                break
            if rec["bn"] == 0:
                good_end, last = end, rec["seq"]
        size = path.stat().st_size
        if good_end == 0:
            if size:
                logger.warning("event log %s: removing %s, which holds no complete batch (%d bytes; never "
                               "acknowledged)", log_dir, path.name, size)
            path.unlink()
            fsync_dir(log_dir)
            continue
        if size > good_end:
            logger.warning("event log %s: cut %d torn byte(s) off %s (a crash or failed write mid-batch; "
                           "never acknowledged)", log_dir, size - good_end, path.name)
            fd = os.open(path, os.O_WRONLY)
            try:
                os.ftruncate(fd, good_end)
                os.fsync(fd)
            finally:
                os.close(fd)
        return last


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


