"""Shard snapshots: a full snapshot plus incremental deltas, written in chunks (off the request path).

Files per shard in the log folder::

    snapshot-sNNN.json                       full: every materialised user at `last_seq`
    snapshot-sNNN.d000000012345.json         delta: the users that changed up to seq 12345 (newer than
                                             the full snapshot); deleted when the next full one is written

Both are JSON lines: a header `{"format": 2, "kind": "full"|"delta", "shard", "last_seq", "created_at",
"base", "tombstones"}`, then one line per user `{"u": user_id, "s": state_to_dict(state)}` (no user vector:
vectors are recomputed). A snapshot written by earlier versions (one JSON object with "users") still loads.

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
from pathlib import Path
from typing import Any

from llmrec.artifacts import atomic_write

logger = logging.getLogger(__name__)

__all__ = ["write_snapshot", "read_snapshots", "remove_user", "full_path", "delta_path", "delta_paths"]

_FORMAT = 2


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


def write_snapshot(path: Path, header: Mapping[str, Any], users: Iterable[tuple[str, dict[str, Any]]],
                   chunk_users: int = 256) -> int:
    """Write header + one line per (user_id, state dict) atomically; returns the bytes written.

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
                batch.append(json.dumps({"u": uid, "s": st}, separators=(",", ":"), allow_nan=False))
                if len(batch) >= chunk_users:
                    n += f.write("\n".join(batch) + "\n")
                    batch = []
                    time.sleep(0)  # let the actor thread serve a request between chunks
            if batch:
                n += f.write("\n".join(batch) + "\n")

    atomic_write(path, write, durable=True, mode=0o600)  # 0o600: it holds user histories
    return n


def read_snapshots(log_dir: str | os.PathLike, shard: int
                   ) -> tuple[dict[str, Any] | None, list[tuple[int, dict[str, dict[str, Any]]]]]:
    """(header of the full snapshot or None, [(last_seq, {user_id: state dict})] of the full snapshot and each
    newer delta, oldest first). The caller drops users deleted at or after each part's seq."""
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


def _read_one(path: Path, shard: int) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    t0 = time.perf_counter()
    with open(path, encoding="utf-8") as f:
        first = json.loads(f.readline())
        if "users" in first:  # format 1: one JSON object
            header, users = {k: v for k, v in first.items() if k != "users"}, first["users"]
        else:
            header, users = first, {}
            for line in f:
                rec = json.loads(line)
                users[rec["u"]] = rec["s"]
    if header.get("shard") != shard:
        raise ValueError(f"{path} is the snapshot of shard {header.get('shard')}, expected {shard}")
    logger.info("shard %d: read snapshot %s (%d users, seq %d) in %.2fs", shard, path.name, len(users),
                header["last_seq"], time.perf_counter() - t0)
    return header, users
