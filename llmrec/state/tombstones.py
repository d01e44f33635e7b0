"""Tombstones: the durable record of the users a shard deleted (keyed hashes, never the ids).

File `tombstones-sNNN.jsonl` in the log folder, one fsync'd line per delete::

    {"user_key": HMAC-SHA256 hex (llmrec.state.privacy), "seq": log seq at the delete, "ts": unix s,
     "purged": false}

and a line with `"purged": true` once the user's logged records are gone from the log segments (the store
does that off the request path; an unpurged tombstone is finished at the next start).

What a tombstone guarantees:

- the user's base history (the run's interactions) is never loaded again, also not from a newer run;
- logged events with seq <= `seq` are never replayed;
- an event of the user whose `ts` is before the delete (`ts` < tombstone ts: a retry of an event sent before
  the DELETE, or one still in flight) is refused, live and on replay, so it cannot recreate the user; events
  stamped after the delete start a fresh user. The rule compares the event's ts with the shard's clock at the
  delete: keep the serving machines' clocks synchronised (NTP).

Tombstones written by earlier versions (`user_sha256`, `crc32`: unsalted, reversible by dictionary) are still
honoured; new ones never use that form.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from llmrec.state.privacy import UserKeyer

logger = logging.getLogger(__name__)

__all__ = ["Tombstones"]


class Tombstones:
    """The deleted users of one shard: {user_key: (seq, ts)}, plus the keys whose log purge is pending.

    Args:
        io: where the lines live: `tomb_lines() -> list[str]` and `tomb_append(line, fsync)` (a shard backend:
            the file `tombstones-sNNN.jsonl`, or a Redis list).
        keyer: the store's `UserKeyer`.
        extra: entries from a snapshot ({key: [seq, ts]}; legacy {sha256: [seq, crc32]} is recognised).
    """

    def __init__(self, io: Any, keyer: UserKeyer, extra: Mapping[str, Any] | None = None) -> None:
        self.io = io
        self.path = getattr(io, "describe", lambda: "tombstones")()
        self.keyer = keyer
        self.entries: dict[str, tuple[int, float]] = {}
        self.legacy: dict[str, int] = {}  # sha256(user_id) -> seq, from versions before keyed hashes
        self.pending: set[str] = set()
        self._read()
        for k, v in (extra or {}).items():
            if k.startswith("sha256:"):
                self._merge_legacy(k[7:], int(v[0]))
            elif isinstance(v, (list, tuple)) and len(v) == 2 and isinstance(v[1], float):
                self._merge(k, int(v[0]), float(v[1]))
            else:  # a snapshot of the previous version: {sha256: [seq, crc32]}
                self._merge_legacy(k, int(v[0]))
        if self.legacy:
            logger.warning("%s: %d tombstone(s) from an older version keep an unsalted sha256 of the user "
                           "id; "
                           "they are still honoured", self.path, len(self.legacy))

    def __len__(self) -> int:
        return len(self.entries) + len(self.legacy)

    def get(self, user_id: str) -> tuple[int, float] | None:
        """(log seq, ts) of the user's latest delete, or None."""
        if not self.entries and not self.legacy:
            return None
        t = self.entries.get(self.keyer.tombstone_key(user_id))
        if self.legacy:
            h = hashlib.sha256(user_id.encode("utf-8", "surrogatepass")).hexdigest()
            if h in self.legacy and (t is None or self.legacy[h] > t[0]):
                t = (self.legacy[h], 0.0)
        return t

    def seq(self, user_id: str) -> int:
        """The log seq at the user's latest delete; -1 when never deleted."""
        t = self.get(user_id)
        return -1 if t is None else t[0]

    def blocks(self, user_id: str, ts: float) -> bool:
        """True when an event of this user with this ts predates the user's latest delete."""
        t = self.get(user_id)
        return t is not None and ts < t[1]

    def add(self, user_id: str, seq: int) -> str:
        """Append the tombstone and fsync it before anything else changes; returns its key."""
        key = self.keyer.tombstone_key(user_id)
        ts = time.time()
        self._append({"user_key": key, "seq": int(seq), "ts": ts, "purged": False}, fsync=True)
        self._merge(key, int(seq), ts)
        self.pending.add(key)
        return key

    def mark_purged(self, key: str) -> None:
        """Record that the delete's log purge finished (no fsync: if lost, the next start only re-scans)."""
        seq, ts = self.entries[key]
        self._append({"user_key": key, "seq": seq, "ts": ts, "purged": True}, fsync=False)
        self.pending.discard(key)

    def matcher(self) -> Callable[[str], bool] | None:
        """`is_deleted(user_id)` for `load_base`, or None when there are no tombstones."""
        if not len(self):
            return None
        return lambda uid: self.get(uid) is not None

    def to_json(self) -> dict[str, list]:
        out: dict[str, list] = {k: [s, t] for k, (s, t) in self.entries.items()}
        out.update({f"sha256:{h}": [s, 0] for h, s in self.legacy.items()})
        return out

    def max_seq(self) -> int:
        return max([s for s, _t in self.entries.values()] + list(self.legacy.values()) + [0])

    # ---- internals
    def _merge(self, key: str, seq: int, ts: float) -> None:
        old = self.entries.get(key)
        self.entries[key] = (max(seq, old[0]), max(ts, old[1])) if old else (seq, ts)

    def _merge_legacy(self, h: str, seq: int) -> None:
        self.legacy[h] = max(seq, self.legacy.get(h, 0))

    def _append(self, rec: dict[str, Any], fsync: bool) -> None:
        self.io.tomb_append(json.dumps(rec) + "\n", fsync)

    def _read(self) -> None:
        torn = 0
        for line in self.io.tomb_lines():  # one line per delete or purge mark
            try:
                rec = json.loads(line) if line.endswith("\n") else None
                seq = int(rec["seq"])
                key = rec.get("user_key")
                if key is None:  # an older version's line
                    self._merge_legacy(rec["user_sha256"], seq)
                    continue
                ts = float(rec["ts"])
            except (ValueError, TypeError, KeyError):
                torn += 1
                continue
            if rec.get("purged"):
                if self.entries.get(key, (0, 0.0))[0] <= seq:
                    self.pending.discard(key)
            else:
                self.pending.add(key)
            self._merge(key, seq, ts)
        if torn:
            logger.warning("%s: skipped %d unreadable line(s) (a crash mid-write: never acknowledged)",
                           self.path, torn)
