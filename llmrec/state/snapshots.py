"""Shard snapshots: a full snapshot plus incremental deltas, written in chunks (off the request path).

Files per shard in the log folder::

    snapshot-sNNN.json                       full: every materialised user at `last_seq`
    snapshot-sNNN.d000000012345.json         delta: the users that changed up to seq 12345 (newer than
                                             the full snapshot); deleted when the next full one is written

Both are JSON lines: a header `{"format": 3, "kind": "full"|"delta", "shard", "last_seq", "created_at",
"base", "tombstones"}`, then one line per user `{"u": user_id, "n": n_events, "s": state_to_dict(state)}`, in
that key order (no user vector: vectors are recomputed). A snapshot written by earlier versions still loads
(format 2: no "n"; format 1: one JSON object with "users").

Reading is lazy: a format-3 line is split by one regular expression into its user id, event count and the
state's JSON text (`StoredState`), which is parsed only when the shard first touches that user
(`llmrec.state.table.UserTable`). A restart thus reads a snapshot at the speed of a line scan instead of
building every user's objects, and a full snapshot writes the text of users nobody touched back as it was.
A line that does not split (an older format) is parsed at once. Corruption inside a state's text is found
when that user is parsed, and raises `SnapshotCorruption` there (`StoredState.load`: a server fault, HTTP 500
for that user's requests, with the file named in the log).

`write_snapshot` serialises a few hundred users per `json.dumps` call and yields the GIL between chunks, so
a snapshot taken by the shard's background thread does not stall the requests the actor thread serves;
the file is written to a temporary name, fsync'd and renamed (atomic), and the temporary file is removed
when anything fails (a full disk). `read_snapshots` returns the full snapshot merged with its deltas.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmrec.artifacts import atomic_write
from llmrec.state.errors import SnapshotCorruption

logger = logging.getLogger(__name__)

__all__ = ["write_snapshot", "read_snapshots", "remove_user", "full_path", "delta_path", "delta_paths",
           "StoredState", "SnapshotState", "state_text", "split_tagged"]

_FORMAT = 3


@dataclass(frozen=True, slots=True)
class StoredState:
    """A user's state as read from a snapshot: the JSON text of `state_to_dict` (no vector), not yet parsed.

    Attributes:
        text: the JSON object text.
        n_events: the state's `n_events` (so a shard counts events without parsing).
        source: where it was read (a file name or Redis key), for the error when the text is corrupt.
    """

    text: str
    n_events: int
    source: str = ""

    def load(self) -> dict[str, Any]:
        """The state dict (`state_from_dict` makes the `UserState`).

        Raises:
            SnapshotCorruption: the text is not a JSON object (a damaged snapshot file or Redis value).
        """
        try:
            d = json.loads(self.text)
            problem = None if isinstance(d, dict) else f"a {type(d).__name__}, not a JSON object"
        except ValueError as e:
            problem = str(e)
        if problem is not None:
            raise SnapshotCorruption(
                f"the snapshot {self.source or '?'} holds a damaged user state ({problem}); restore it from "
                "a backup, or remove the shard's snapshot files so it replays the whole log (complete only "
                "if no log segment was retired)")
        return d


SnapshotState = dict[str, Any] | StoredState  # a state dict, or its unparsed text


def state_text(st: SnapshotState) -> tuple[str, int]:
    """(JSON text, n_events) of a state dict or a `StoredState` (whose text is written back unchanged)."""
    if isinstance(st, StoredState):
        return st.text, st.n_events
    return json.dumps(st, separators=(",", ":"), allow_nan=False), int(st.get("n_events", 0))


def split_tagged(line: str, rx: re.Pattern[str], source: str) -> tuple[str, StoredState] | None:
    """(first field, StoredState) of a `{"<k>":<field>,"n":<int>,"s":<state>}` line matched by `rx` (groups:
    field, n, state text); None when the line does not match (an older format: parse it whole)."""
    m = rx.match(line)
    if m is None:
        return None
    return m.group(1), StoredState(m.group(3), int(m.group(2)), source)


# a format-3 user line; group 1 is the user id as a JSON string literal
_USER_LINE = re.compile(r'\{"u":("(?:[^"\\]|\\.)*"),"n":(\d+),"s":(\{.*\})\}\s*\Z', re.S)


def full_path(log_dir: str | os.PathLike, shard: int) -> Path:
    return Path(log_dir) / f"snapshot-s{shard:03d}.json"


def delta_path(log_dir: str | os.PathLike, shard: int, seq: int) -> Path:
    return Path(log_dir) / f"snapshot-s{shard:03d}.d{seq:012d}.json"


def delta_paths(log_dir: str | os.PathLike, shard: int) -> list[tuple[int, Path]]:
    """(seq, path) of the shard's delta files, oldest first."""
    rx = re.compile(rf"^snapshot-s{shard:03d}\.d(\d{{12}})\.json$")
    d = Path(log_dir)
    out = [(int(m.group(1)), p) for p in (d.iterdir() if d.is_dir() else []) if (m := rx.match(p.name))]
    return sorted(out)


def write_snapshot(path: Path, header: Mapping[str, Any], users: Iterable[tuple[str, SnapshotState]],
                   chunk_users: int = 256) -> int:
    """Write header + one line per (user_id, state dict or `StoredState`) atomically; returns the bytes
    written.

    Raises:
        OSError: the write failed (the previous file at `path` stays whole; the temporary file is removed).
    """
    n = 0

    def write(tmp: Path) -> None:
        nonlocal n
        with open(tmp, "w", encoding="utf-8") as f:
            head = json.dumps({"format": _FORMAT, **header}, separators=(",", ":"), allow_nan=False)
            n += f.write(head + "\n")
            batch: list[str] = []
            for uid, st in users:
                text, n_events = state_text(st)
                batch.append(f'{{"u":{json.dumps(uid)},"n":{n_events},"s":{text}}}')
                if len(batch) >= chunk_users:
                    n += f.write("\n".join(batch) + "\n")
                    batch = []
                    time.sleep(0)  # let the actor thread serve a request between chunks
            if batch:
                n += f.write("\n".join(batch) + "\n")

    atomic_write(path, write, durable=True, mode=0o600)  # 0o600: it holds user histories
    return n


def read_snapshots(log_dir: str | os.PathLike, shard: int
                   ) -> tuple[dict[str, Any] | None, list[tuple[int, dict[str, SnapshotState]]]]:
    """(header of the full snapshot or None, [(last_seq, {user_id: StoredState, or a state dict from an
    older format})] of the full snapshot and each newer delta, oldest first). The caller drops users deleted
    at or after each part's seq."""
    path = full_path(log_dir, shard)
    header, parts = None, []
    if path.is_file():
        header, users = _read_one(path, shard)
        parts.append((int(header["last_seq"]), users))
    base_seq = parts[0][0] if parts else -1
    for seq, p in delta_paths(log_dir, shard):
        if seq <= base_seq:
            continue  # written before the full snapshot that covers it (a crash before its removal)
        h, users = _read_one(p, shard)
        if header is None:
            header = h
        header = {**header, "last_seq": h["last_seq"], "tombstones": h.get("tombstones", {})}
        parts.append((int(h["last_seq"]), users))
    return header, parts


def remove_user(log_dir: str | os.PathLike, shard: int, user_id: str) -> int:
    """Rewrite the shard's snapshot files without `user_id` (for a stopped shard: `llmrec forget`); returns
    how many files held the user."""
    n = 0
    paths = [full_path(log_dir, shard)] + [p for _s, p in delta_paths(log_dir, shard)]
    for path in paths:
        if not path.is_file():
            continue
        header, users = _read_one(path, shard)
        if users.pop(user_id, None) is None:
            continue
        header.pop("format", None)
        write_snapshot(path, header, users.items())
        n += 1
    return n


def _read_one(path: Path, shard: int) -> tuple[dict[str, Any], dict[str, SnapshotState]]:
    t0 = time.perf_counter()
    users: dict[str, SnapshotState]
    with open(path, encoding="utf-8") as f:
        first = json.loads(f.readline())
        if "users" in first:  # format 1: one JSON object
            header, users = {k: v for k, v in first.items() if k != "users"}, first["users"]
        else:
            header, users = first, {}
            for line in f:
                got = split_tagged(line, _USER_LINE, path.name)
                if got is not None:
                    lit, st = got
                    users[lit[1:-1] if "\\" not in lit else json.loads(lit)] = st
                else:  # format 2, or a line this reader cannot split
                    rec = json.loads(line)
                    users[rec["u"]] = rec["s"]
    if header.get("shard") != shard:
        raise ValueError(f"{path} is the snapshot of shard {header.get('shard')}, expected {shard}")
    logger.info("shard %d: read snapshot %s (%d users, seq %d) in %.2fs", shard, path.name, len(users),
                header["last_seq"], time.perf_counter() - t0)
    return header, users
