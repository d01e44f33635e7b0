"""Sharded per-user state on Ray: `UserStateShard` actors (log first, then memory), `StateStore` client.

Each shard owns the users with `shard_of(user_id, n_shards) == shard_id` (zlib.crc32, stable across
processes, unlike Python's salted `hash()`), one `EventLog` shard in `log_dir` and a snapshot file
`snapshot-sNNN.json` there. `apply` validates the whole batch, drops duplicates (event ids already applied
to that user, or repeated in the batch), appends the rest to the log with fsync, and only then updates memory
and replies: an acknowledged event is on disk, and a retry of an event whose reply was lost is recognised
(its id is in `UserState.applied_ids`, rebuilt by the log replay), so every event counts exactly once.

Users the run already knows (the base): with `base_dir` (RUN/data) each shard loads, itself, the last
`history_len` events of ITS users from `interactions.parquet` into compact arrays (`llmrec.state.base`). A
`UserState` is materialised only for a user who sends feedback (an overlay on its base history); `get` of a
base-only user builds a transient state from the arrays. An item event equal to one of the user's base
events on (item_id, event, ts) is a duplicate (not logged, not applied), live and on log replay.

Files per shard in `log_dir`: log segments, `snapshot-sNNN.json` (materialised users, tombstones, the base
descriptor, the log's last seq) and `tombstones-sNNN.jsonl` (one fsync'd line per delete: sha256 and crc32
of the user id, not the id, and the log seq at the delete). On (re)start a shard loads its base; when the
snapshot was taken over the same base (equal `base.base_descriptor`: path, size, mtime, prepare fingerprint,
history_len) it loads the snapshot and replays the log records after its seq, else it replays the whole log
over the new base. A hot swap (`StateStore.set_base`) does the same: each shard loads the new base in a
background thread while it keeps serving from the old one, then commits (whole-log replay, swap,
snapshot). Logged events of a deleted user up to its tombstone are never replayed, and its base history is
never loaded again; a later event starts a fresh state. Vectors are not trusted from the snapshot (the
vectorizer may have changed): they are recomputed lazily on `get`.

`StateStore` creates (or joins) named detached actors `{name}-{i}` in `namespace` with `max_restarts=-1`
and `num_cpus=0`, routes calls by `shard_of`, and when an actor dies mid-call (`RayActorError`, which covers
`ActorDiedError` and `ActorUnavailableError`) waits up to `retry_timeout_s` for Ray to restart it and sends
the same call once more (the client assigns event ids BEFORE the first send, so the retry is idempotent).

Choices the design leaves open:
- `log_dir/meta.json` (stage "events") records `n_shards`; a store with another `n_shards` on the same
  folder is refused (users would map to other shards than their logged events).
- Joining existing actors whose `log_dir` differs from ours is refused (pass the same folder or another name).
- `delete` writes the tombstone, removes the user from memory, writes a snapshot, then rewrites the log
  segments without the user (a crash before that last step is finished at the next start).
- `get` returns the summary (`user_state.summary`: text_feedback entries carry their `vec`) plus `vector`
  (list[float] or None) and `shard`; `n_events` / `version` of a base user count its base events.
- A shard Ray restarts after a crash keeps the base its snapshot names (a `set_base` after the constructor).
- The vectorizer factory should be small (a path, not arrays): Ray stores constructor arguments over ~100 KB
  in the object store, where a detached actor's restart can no longer find them once the creating driver is
  gone (ray-project/ray#53727). `EmbeddingsMeanVectorizer(embeddings_dir)` is the small production factory.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmrec.schema import META_FILE
from llmrec.state.base import BaseHistories, base_descriptor, deleted_user_key, load_base
from llmrec.state.event_log import EventLog, iter_events
from llmrec.state.user_state import (
    Event,
    MeanVectorizer,
    UserState,
    apply_event,
    state_from_dict,
    state_to_dict,
    summary,
)

logger = logging.getLogger(__name__)

__all__ = ["StateStore", "UserStateShard", "shard_of", "EmbeddingsMeanVectorizer"]

_SNAPSHOT = "snapshot-s{:03d}.json"
_TOMBSTONES = "tombstones-s{:03d}.jsonl"


def shard_of(user_id: str, n_shards: int) -> int:
    """Stable shard of a user: zlib.crc32(utf-8 bytes) % n_shards (same in every process and run)."""
    return zlib.crc32(user_id.encode("utf-8")) % n_shards


class UserStateShard:
    """State of the users of one shard (use as a Ray actor via `StateStore`; also works as a plain object).

    Args:
        shard_id: this shard's id (names its log segments, snapshot and tombstone file).
        log_dir: the shared event-log folder.
        vectorizer_factory: picklable zero-arg callable returning a vectorizer `(UserState) -> (D,) | None`;
            called here, inside the actor, so a model loads in the actor. None = no vectors.
        snapshot_every: write a snapshot after this many new events.
        history_len: bound of each user's history (also the base window kept per user).
        n_shards: when given, events of users that belong to another shard are refused, and only this
            shard's users are loaded from the base.
        base_dir: the run's prepared data folder (RUN/data, or its interactions.parquet): this shard's users
            start from their histories there (`llmrec.state.base`). None = start empty.
    """

    def __init__(self, shard_id: int, log_dir: str, vectorizer_factory: Callable[[], Any] | None = None,
                 snapshot_every: int = 1000, history_len: int = 200, *, n_shards: int | None = None,
                 base_dir: str | None = None) -> None:
        t0 = time.perf_counter()
        if snapshot_every < 1:
            raise ValueError(f"snapshot_every must be >= 1, got {snapshot_every}")
        self.shard_id = int(shard_id)
        self.log_dir = str(log_dir)
        Path(self.log_dir).mkdir(parents=True, exist_ok=True)
        self.n_shards = n_shards
        self.snapshot_every = int(snapshot_every)
        self.history_len = int(history_len)
        # deleted users: sha256(user_id) -> (log seq at the (latest) delete, crc32(user_id)); not the ids
        self.tombstones, pending = _read_tombstones(self._tomb_path())
        snap = self._read_snapshot()
        for h, (seq, crc) in ((snap or {}).get("tombstones") or {}).items():
            self.tombstones[h] = (max(int(seq), self.tombstones.get(h, (0, 0))[0]), int(crc))
        snap_seq = int(snap["last_seq"]) if snap else 0
        self.log = EventLog(self.log_dir, shard=self.shard_id,
                            min_next_seq=max([snap_seq] + [t[0] for t in self.tombstones.values()]) + 1)
        if pending:
            self._finish_deletes(pending)
        self.base: BaseHistories | None = None
        self.base_info: dict[str, Any] = {}
        self._pending: dict[str, Any] | None = None  # a base loading in the background (prepare_base)
        self._set_loaded_base(self._load_base(self._base_dir_at_start(base_dir, snap)))
        self.users: dict[str, UserState] = {}
        after = 0
        if snap is not None and snap.get("base") == self._base_desc():
            # a user deleted at or after the snapshot's seq (a crash before the delete's own snapshot) is gone
            self.users = {uid: state_from_dict(d) for uid, d in snap["users"].items()
                          if self._tomb_seq(uid) < snap_seq}
            after = snap_seq
        elif snap is not None:
            logger.info("shard %d: the base changed since the snapshot (%s -> %s): replaying the whole log "
                        "over the new base", self.shard_id, _short(snap.get("base")),
                        _short(self._base_desc()))
        self.replay_counts = self._replay(self.users, self.base, after)
        self.replayed = self.replay_counts["replayed"]
        self._since_snapshot = self.replayed
        self._recount()
        self.vectorizer = vectorizer_factory() if vectorizer_factory is not None else None
        self._dirty: set[str] = set(self.users)
        logger.info("shard %d ready: %d users (%d from the base only, %d materialised), snapshot seq %d + "
                    "replay %s in %.2fs", self.shard_id, self._n_users(), self._n_base_live, len(self.users),
                    snap_seq, self.replay_counts, time.perf_counter() - t0)

    # ---- API -----------------------------------------------------------------------------------------
    def apply(self, events: Sequence[Mapping[str, Any] | Event]) -> list[dict[str, Any]]:
        """Validate all, de-duplicate, log with fsync, then update memory and vectors.

        Duplicates (answered `duplicate: true`, neither logged nor applied): an event id already applied to
        that user or repeated in the batch, and an item event equal to one of the user's base events on
        (item_id, event, ts) (`BaseHistories.has_event`).

        Returns:
            one dict per input event, in order: {user_id, event_id, state_version, duplicate}.
        Raises:
            ValueError: an event is invalid or belongs to another shard (nothing is applied then).
        """
        evs = [self._validate(i, e) for i, e in enumerate(events)]
        batch_ids: set[str] = set()
        new: list[Event] = []
        dup_flags: list[bool] = []
        for ev in evs:
            dup = ev.event_id in batch_ids or self._duplicate(self.users, self.base, ev) is not None
            batch_ids.add(ev.event_id)
            dup_flags.append(dup)
            if not dup:
                new.append(ev)
        self.log.append(new)  # durable before memory changes and before we reply
        versions: dict[str, int] = {}
        for ev in new:
            versions[ev.event_id] = self._fold(self.users, self.base, ev, count=True).version
        for uid in {ev.user_id for ev in new}:
            self._refresh_vector(uid)
        self._since_snapshot += len(new)
        if self._since_snapshot >= self.snapshot_every:
            self.snapshot()
        return [
            {"user_id": ev.user_id, "event_id": ev.event_id, "duplicate": dup,
             "state_version": self._version(ev.user_id) if dup else versions[ev.event_id]}
            for ev, dup in zip(evs, dup_flags)
        ]

    def get(self, user_id: str) -> dict[str, Any] | None:
        """Summary (`user_state.summary`, text_feedback entries with `vec`) + `vector` (list[float] (D,) or
        None) + `shard`; None for an unknown user. A base-only user gets a transient state from the arrays."""
        st = self.users.get(user_id)
        if st is not None:
            if user_id in self._dirty:
                self._refresh_vector(user_id)
                st = self.users[user_id]
            return {**summary(st), "vector": st.vector, "shard": self.shard_id}
        r = self._base_row(self.base, user_id)
        if r is None:
            return None
        st = self.base.state(r, history_len=self.history_len)  # type: ignore[union-attr]
        vec = self.vectorizer(st) if self.vectorizer is not None else None
        return {**summary(st), "vector": None if vec is None else np.asarray(vec, np.float32).tolist(),
                "shard": self.shard_id}

    def delete(self, user_id: str) -> bool:
        """Forget a user: a durable tombstone first (its base history is never loaded again, its logged
        events up to now are never replayed), then memory, a fresh snapshot, then the logged events.
        True if anything was removed."""
        if not isinstance(user_id, str) or not user_id:
            raise ValueError(f"user_id must be a non-empty string, got {user_id!r}")
        r = self._base_row(self.base, user_id)
        self._write_tombstone(user_id, self.log.last_seq)
        gone = self.users.pop(user_id, None)
        if gone is not None:
            self._n_events -= gone.n_events
        elif r is not None:  # a base-only user
            self._n_base_live -= 1
            self._n_events -= int(self.base.n_total[r])  # type: ignore[union-attr]
        if r is not None:
            self.base.hidden.add(r)  # type: ignore[union-attr]  # the arrays keep it until the next load
        if self._pending is not None:  # a base loading in the background may hold the user too
            self._pending["deleted"].append(user_id)
        self._dirty.discard(user_id)
        self.snapshot()
        removed = self.log.forget_user(user_id)
        self._mark_purged(deleted_user_key(user_id)[1])
        existed = gone is not None or r is not None
        logger.info("shard %d: deleted user %r (in memory: %s, in the base: %s, %d logged events)",
                    self.shard_id, user_id, gone is not None, r is not None, removed)
        return existed or removed > 0

    def set_base(self, data_dir: str | os.PathLike | None) -> dict[str, Any]:
        """Swap the base to another run's data folder (None = no base): `prepare_base` then `commit_base`.

        A no-op when the base is unchanged (same `base_descriptor`). As one blocking call, requests to this
        shard wait for the load; `StateStore.set_base` runs the two steps apart, so they wait only for the
        commit (the log replay).
        """
        self.prepare_base(data_dir)
        return self.commit_base(data_dir)

    def prepare_base(self, data_dir: str | os.PathLike | None) -> dict[str, Any]:
        """Start loading `data_dir` in a background thread; requests keep being served from the current base.

        Returns:
            `base_status(data_dir)`.
        Raises:
            FileNotFoundError: no interactions file there (checked before anything starts).
        """
        want = None if data_dir is None else base_descriptor(data_dir, self.history_len)
        p = self._pending
        if want != self._base_desc() and (p is None or p["want"] != want):
            if p is not None:
                logger.warning("shard %d: base load of %s abandoned for %s", self.shard_id, p["data_dir"],
                               data_dir)
            p = self._pending = {"want": want, "data_dir": data_dir, "done": threading.Event(),
                                 "result": None, "error": None, "deleted": []}
            deleted = [(crc, h) for h, (_seq, crc) in self.tombstones.items()]
            threading.Thread(target=self._load_pending, args=(p, deleted), daemon=True,
                             name=f"base-load-s{self.shard_id}").start()
        return self.base_status(data_dir)

    def base_status(self, data_dir: str | os.PathLike | None) -> dict[str, Any]:
        """{current: this base is in use, ready: `commit_base(data_dir)` will not wait for a load}."""
        want = None if data_dir is None else base_descriptor(data_dir, self.history_len)
        p = self._pending
        current = want == self._base_desc()
        loading = p is not None and p["want"] == want
        return {"shard": self.shard_id, "current": current, "loading": loading and not p["done"].is_set(),
                "ready": current or (loading and p["done"].is_set())}

    def commit_base(self, data_dir: str | os.PathLike | None) -> dict[str, Any]:
        """Swap to `data_dir`'s base: wait for its load (or load it now when `prepare_base` did not, e.g.
        after a restart), rebuild every materialised user from the new base + the whole log (duplicates of
        base events skipped, deleted users stay deleted), swap, snapshot. A no-op when it is current."""
        t0 = time.perf_counter()
        want = None if data_dir is None else base_descriptor(data_dir, self.history_len)
        if want == self._base_desc():
            return {"shard": self.shard_id, "changed": False, "base": self.base_info}
        p = self._pending
        if p is None or p["want"] != want:
            self.prepare_base(data_dir)
            p = self._pending
        p["done"].wait()
        self._pending = None
        if p["error"] is not None:
            raise RuntimeError(f"shard {self.shard_id}: loading the base {data_dir} failed: {p['error']}")
        loaded = p["result"]
        new_base = loaded[0] if loaded else None
        for uid in p["deleted"]:  # deleted while it loaded: hide them in the new base too
            r = new_base.row(uid) if new_base is not None else None
            if r is not None:
                new_base.hidden.add(r)  # type: ignore[union-attr]
        t1 = time.perf_counter()
        users: dict[str, UserState] = {}
        counts = self._replay(users, new_base, 0)
        self._set_loaded_base(loaded)
        self.users = users
        self._recount()
        self._dirty = set(users)
        self.snapshot()
        logger.info("shard %d: base swapped to %s: %d users; log replay %s in %.2fs", self.shard_id,
                    data_dir, self._n_users(), counts, time.perf_counter() - t1)
        return {"shard": self.shard_id, "changed": True, "base": self.base_info, "replay": counts,
                "commit_s": time.perf_counter() - t1, "wall_s": time.perf_counter() - t0}

    def stats(self) -> dict[str, Any]:
        return {
            "shard_id": self.shard_id, "n_users": self._n_users(),
            "n_events": self._n_events, "n_base_users": self._n_base_live, "n_materialised": len(self.users),
            "n_tombstones": len(self.tombstones), "base": self.base_info, "last_seq": self.log.last_seq,
            "log_dir": self.log_dir, "replayed_at_start": self.replayed,
            "since_snapshot": self._since_snapshot, "pid": os.getpid(),
        }

    def snapshot(self) -> dict[str, Any]:
        """Write the materialised users, the tombstones and the base descriptor atomically to
        `snapshot-sNNN.json` (with the log's last seq). Base-only users are not in it: the base file is."""
        t0 = time.perf_counter()
        path = Path(self.log_dir) / _SNAPSHOT.format(self.shard_id)
        body = {"shard": self.shard_id, "last_seq": self.log.last_seq, "created_at": time.time(),
                "base": self._base_desc(), "tombstones": self.tombstones,
                "users": {uid: state_to_dict(st) for uid, st in self.users.items()}}
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(body, f, separators=(",", ":"), allow_nan=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(self.log_dir)
        self._since_snapshot = 0
        dt = time.perf_counter() - t0
        logger.info("shard %d: snapshot of %d users at seq %d in %.3fs", self.shard_id, len(self.users),
                    self.log.last_seq, dt)
        return {"path": str(path), "last_seq": self.log.last_seq, "n_users": len(self.users), "wall_s": dt}

    def set_vectorizer(self, vectorizer_factory: Callable[[], Any] | None) -> int:
        """Swap the vectorizer (e.g. a new scorer); every vector is recomputed on its next `get`."""
        self.vectorizer = vectorizer_factory() if vectorizer_factory is not None else None
        self._dirty = set(self.users)
        return len(self._dirty)

    def ping(self) -> int:
        return self.shard_id

    def close(self) -> None:
        """Release the log (its file lock); only needed when used as a plain object (tests, tools)."""
        self.log.close()

    # ---- internals -----------------------------------------------------------------------------------
    def _new_state(self, user_id: str) -> UserState:
        return UserState(user_id=user_id, history_len=self.history_len)

    def _base_row(self, base: BaseHistories | None, user_id: str) -> int | None:
        """The user's row in `base`, unless there is no base or the user was deleted."""
        return None if base is None else base.row(user_id)

    def _duplicate(self, users: dict[str, UserState], base: BaseHistories | None, ev: Event) -> str | None:
        """"id" (event id already applied), "base" (equals a base event of the user), or None (new)."""
        st = users.get(ev.user_id)
        if st is not None and st.has_applied(ev.event_id):
            return "id"
        if ev.item_id is not None:
            r = self._base_row(base, ev.user_id)
            if r is not None and base.has_event(r, ev.item_id, ev.event, ev.ts):  # type: ignore[union-attr]
                return "base"
        return None

    def _fold(self, users: dict[str, UserState], base: BaseHistories | None, ev: Event, *,
              count: bool = False) -> UserState:
        """Apply `ev` to its user in `users`, materialising a base user (overlay on its base history)."""
        st = users.get(ev.user_id)
        if st is None:
            r = self._base_row(base, ev.user_id)
            if r is None:
                st = self._new_state(ev.user_id)
            else:
                st = base.state(r, history_len=self.history_len)  # type: ignore[union-attr]
                if count:
                    self._n_base_live -= 1  # its base events stay counted in _n_events
        new = apply_event(st, ev)
        users[ev.user_id] = new
        if count:
            self._n_events += 1
        return new

    def _replay(self, users: dict[str, UserState], base: BaseHistories | None, after_seq: int
                ) -> dict[str, int]:
        """Fold this shard's log records with seq > after_seq into `users` (over `base`), skipping invalid
        records, duplicates and the events of deleted users up to their tombstone."""
        c = {"replayed": 0, "duplicate_id": 0, "duplicate_base": 0, "deleted": 0, "invalid": 0}
        counters: dict[str, int] = {}
        for rec in iter_events(self.log_dir, shard=self.shard_id, after_seq=after_seq, counters=counters):
            fields = {k: v for k, v in rec.items() if k not in ("seq", "shard")}
            try:
                ev = Event.from_dict(fields)
            except ValueError as e:
                c["invalid"] += 1
                logger.error("shard %d: log record seq %s is invalid, skipped: %s", self.shard_id,
                             rec["seq"], e)
                continue
            if rec["seq"] <= self._tomb_seq(ev.user_id):
                c["deleted"] += 1
                continue
            dup = self._duplicate(users, base, ev)
            if dup is not None:
                c[f"duplicate_{dup}"] += 1
                continue
            self._fold(users, base, ev)
            c["replayed"] += 1
        c["torn"] = counters.get("torn", 0)
        return c

    def _finish_deletes(self, pending: set[str]) -> None:
        """Purge from the log the events (up to the tombstone) of users whose delete a crash interrupted
        after its tombstone: the tombstone names a hash, so the log is scanned for matching ids."""
        crcs = {self.tombstones[h][1] for h in pending}
        found: set[str] = set()
        for rec in iter_events(self.log_dir, shard=self.shard_id):
            uid = rec.get("user_id")
            if isinstance(uid, str) and zlib.crc32(uid.encode("utf-8", "surrogatepass")) in crcs \
                    and deleted_user_key(uid)[1] in pending:
                found.add(uid)
        for uid in found:
            n = self.log.forget_user(uid, max_seq=self._tomb_seq(uid))
            logger.warning("shard %d: finished an interrupted delete: purged %d logged events", self.shard_id,
                           n)
        for h in pending:
            self._mark_purged(h)

    def _recount(self) -> None:
        """Recompute the O(1) counters after a (re)build: users/events from the base only + materialised."""
        base = self.base
        self._n_events = sum(s.n_events for s in self.users.values())
        self._n_base_live = 0
        if base is not None:
            hidden = {r for r in (base.row(u) for u in self.users) if r is not None} | base.hidden
            self._n_base_live = base.n_users - len(hidden)
            self._n_events += int(base.n_total.sum(dtype=np.int64)) - int(
                base.n_total[np.fromiter(hidden, np.int64, len(hidden))].sum(dtype=np.int64))

    def _n_users(self) -> int:
        return len(self.users) + self._n_base_live

    def _version(self, user_id: str) -> int:
        st = self.users.get(user_id)
        if st is not None:
            return st.version
        r = self._base_row(self.base, user_id)
        return int(self.base.n_total[r]) if r is not None else 0  # type: ignore[union-attr]

    def _validate(self, i: int, e: Mapping[str, Any] | Event) -> Event:
        try:
            ev = e if isinstance(e, Event) else Event.from_dict(e)
        except ValueError as err:
            raise ValueError(f"events[{i}]: {err}") from None
        if self.n_shards is not None and shard_of(ev.user_id, self.n_shards) != self.shard_id:
            raise ValueError(f"events[{i}]: user {ev.user_id!r} belongs to shard "
                             f"{shard_of(ev.user_id, self.n_shards)}, not {self.shard_id}; "
                             "route with shard_of()")
        dim = getattr(self.vectorizer, "dim", None)
        if dim is not None and ev.text_vec is not None and len(ev.text_vec) != dim:
            raise ValueError(f"events[{i}]: text_vec has {len(ev.text_vec)} values, the item space has "
                             f"dim {dim}; encode feedback text with the same model as the items")
        return ev if ev.event_id else ev.with_id(uuid.uuid4().hex)

    def _refresh_vector(self, user_id: str) -> None:
        st = self.users[user_id]
        vec = self.vectorizer(st) if self.vectorizer is not None else None
        st.vector = None if vec is None else np.asarray(vec, dtype=np.float32).tolist()
        self._dirty.discard(user_id)

    # -- base
    def _base_desc(self) -> dict[str, Any] | None:
        return None if self.base is None else self.base.descriptor

    def _base_dir_at_start(self, base_dir: str | None, snap: dict[str, Any] | None) -> str | None:
        """The constructor's base, except for an actor Ray restarted after a crash: it keeps the base its
        snapshot names (a `set_base` swap happened after the constructor's arguments were fixed)."""
        if snap is None or "base" not in snap or not _actor_was_restarted():
            return base_dir
        b = snap["base"]
        if b is not None and not Path(b["path"]).is_file():
            logger.error("shard %d: the base of the snapshot, %s, is gone; using the constructor's %s",
                         self.shard_id, b["path"], base_dir)
            return base_dir
        return None if b is None else b["path"]

    def _load_pending(self, p: dict[str, Any], deleted: list[tuple[int, str]]) -> None:
        try:
            p["result"] = self._load_base(p["data_dir"], deleted)
        except Exception as e:  # noqa: BLE001 - reported by commit_base, in the caller's process
            logger.exception("shard %d: loading the base %s failed", self.shard_id, p["data_dir"])
            p["error"] = f"{type(e).__name__}: {e}"
        finally:
            p["done"].set()

    def _load_base(self, data_dir: str | os.PathLike | None, deleted: list[tuple[int, str]] | None = None
                   ) -> tuple[BaseHistories, dict[str, Any]] | None:
        if data_dir is None:
            return None
        if deleted is None:
            deleted = [(crc, h) for h, (_seq, crc) in self.tombstones.items()]
        gc.collect()
        rss0 = _rss_bytes()
        base = load_base(data_dir, shard_id=self.shard_id, n_shards=self.n_shards,
                         history_len=self.history_len, deleted=deleted)
        import pyarrow as pa

        pa.default_memory_pool().release_unused()  # hand the load's transient buffers back to the OS
        gc.collect()
        _trim_heap()
        rss1 = _rss_bytes()
        info = {**base.info(), "rss_before_bytes": rss0,
                "rss_delta_bytes": None if rss0 is None or rss1 is None else rss1 - rss0,
                "rss_peak_bytes": _rss_peak_bytes()}
        return base, info

    def _set_loaded_base(self, loaded: tuple[BaseHistories, dict[str, Any]] | None) -> None:
        if loaded is None:
            self.base, self.base_info = None, {}
            logger.info("shard %d: no base data folder: users start empty", self.shard_id)
        else:
            self.base, self.base_info = loaded

    # -- tombstones
    def _tomb_path(self) -> Path:
        return Path(self.log_dir) / _TOMBSTONES.format(self.shard_id)

    def _tomb_seq(self, user_id: str) -> int:
        """The log seq at the user's latest delete; -1 when never deleted."""
        if not self.tombstones:
            return -1
        t = self.tombstones.get(deleted_user_key(user_id)[1])
        return -1 if t is None else t[0]

    def _write_tombstone(self, user_id: str, seq: int) -> None:
        """Append {sha256, crc32, seq} to `tombstones-sNNN.jsonl` and fsync before anything else changes."""
        crc, h = deleted_user_key(user_id)
        path = self._tomb_path()
        new_file = not path.exists()
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"user_sha256": h, "crc32": crc, "seq": int(seq), "ts": time.time(),
                                "purged": False}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if new_file:
            _fsync_dir(self.log_dir)
        self.tombstones[h] = (max(int(seq), self.tombstones.get(h, (0, 0))[0]), crc)

    def _mark_purged(self, h: str) -> None:
        """Record that the delete's log purge finished (no fsync: if lost, the next start only re-scans)."""
        seq, crc = self.tombstones[h]
        with open(self._tomb_path(), "a", encoding="utf-8") as f:
            f.write(json.dumps({"user_sha256": h, "crc32": crc, "seq": seq, "ts": time.time(),
                                "purged": True}) + "\n")

    def _read_snapshot(self) -> dict[str, Any] | None:
        path = Path(self.log_dir) / _SNAPSHOT.format(self.shard_id)
        if not path.is_file():
            return None
        t0 = time.perf_counter()
        body = json.loads(path.read_text(encoding="utf-8"))
        if body.get("shard") != self.shard_id:
            raise ValueError(f"{path} is the snapshot of shard {body.get('shard')}, expected {self.shard_id}")
        logger.info("shard %d: read snapshot %s (%d users, seq %d) in %.2fs", self.shard_id, path,
                    len(body["users"]), body["last_seq"], time.perf_counter() - t0)
        return body


def _read_tombstones(path: Path) -> tuple[dict[str, tuple[int, int]], set[str]]:
    """(sha256(user_id) -> (log seq at its latest delete, crc32), hashes whose log purge is not recorded as
    done); skips a torn line (never acknowledged)."""
    out: dict[str, tuple[int, int]] = {}
    pending: set[str] = set()
    if not path.is_file():
        return out, pending
    torn = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line) if line.endswith("\n") else None
                h, seq, crc = rec["user_sha256"], int(rec["seq"]), int(rec["crc32"])
            except (ValueError, TypeError, KeyError):
                torn += 1
                continue
            if rec.get("purged") and out.get(h, (0, 0))[0] <= seq:
                pending.discard(h)
            elif not rec.get("purged"):
                pending.add(h)
            out[h] = (max(seq, out.get(h, (0, 0))[0]), crc)
    if torn:
        logger.warning("%s: skipped %d unreadable line(s) (a crash mid-write: never acknowledged)", path,
                       torn)
    return out, pending


def _actor_was_restarted() -> bool:
    try:
        import ray

        if not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
            return False
        return bool(ray.get_runtime_context().was_current_actor_reconstructed)
    except Exception:  # noqa: BLE001 - no actor context (plain object, tools): not a restart
        return False


def _trim_heap() -> None:
    """glibc keeps freed numpy temporaries of a few MB in its heap; give them back (Linux/glibc only)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def _rss_peak_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def _fsync_dir(d: str | os.PathLike) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _short(desc: dict[str, Any] | None) -> str:
    if desc is None:
        return "none"
    return f"{desc['path']} ({desc['size']} B, fingerprint {desc['prepare_fingerprint']})"


@dataclass(frozen=True)
class EmbeddingsMeanVectorizer:
    """Picklable zero-arg vectorizer factory: loads `embeddings_dir/embeddings.parquet` inside the actor.

    Example::

        store = StateStore(4, "RUN/events", vectorizer_factory=EmbeddingsMeanVectorizer("RUN/embeddings"))
    """

    embeddings_dir: str
    half_life: float = 20.0
    negative_weight: float = 0.5
    text_weight: float = 0.5

    def __call__(self) -> MeanVectorizer:
        from llmrec.embed.artifact import load_embeddings  # checks the file against its meta.json

        emb = load_embeddings(self.embeddings_dir)
        return MeanVectorizer(emb.item_ids, emb.vectors, half_life=self.half_life,
                              negative_weight=self.negative_weight, text_weight=self.text_weight)


class StateStore:
    """Client facade over `n_shards` named detached `UserStateShard` actors.

    Async methods (`apply`, `get`, `delete`, `stats`) are for Serve replicas; `*_sync` twins for scripts.
    Joining running actors (same `name` and `namespace`) keeps their vectorizer and settings; use
    `set_vectorizer_sync` to swap the vectorizer.

    Example::

        store = StateStore(n_shards=2, log_dir="RUN/events")
        store.apply_sync([{"user_id": "u1", "item_id": "i9", "event": "like"}])
        store.get_sync("u1")["n_events"]  # 1
        store.shutdown()
    """

    def __init__(self, n_shards: int = 4, log_dir: str | os.PathLike | None = None, namespace: str = "llmrec",
                 vectorizer_factory: Callable[[], Any] | None = None, name: str = "llmrec-state", *,
                 snapshot_every: int = 1000, history_len: int = 200, retry_timeout_s: float = 60.0,
                 base_dir: str | os.PathLike | None = None) -> None:
        import ray

        if not isinstance(n_shards, int) or n_shards < 1:
            raise ValueError(f"n_shards must be an int >= 1, got {n_shards!r}")
        if log_dir is None:
            raise ValueError("log_dir is required: the folder for the event log and snapshots "
                             "(e.g. RUN/events)")
        if not ray.is_initialized():
            raise ValueError("Ray is not initialised; call llmrec.raysetup.init_ray() before StateStore(...)")
        self.n_shards = n_shards
        self.log_dir = os.path.abspath(os.fspath(log_dir))
        self.namespace = namespace
        self.name = name
        self.retry_timeout_s = float(retry_timeout_s)
        base_dir = None if base_dir is None else os.path.abspath(os.fspath(base_dir))
        _check_log_meta(self.log_dir, n_shards)
        if vectorizer_factory is not None:
            from ray import cloudpickle

            nbytes = len(cloudpickle.dumps(vectorizer_factory))
            if nbytes > 100_000:  # Ray then keeps the actor's constructor args in the object store
                logger.warning("vectorizer_factory pickles to %d bytes; a restarted detached shard needs its "
                               "constructor args, which Ray keeps only while this driver lives: pass a small "
                               "factory that loads the data itself (e.g. EmbeddingsMeanVectorizer(dir))",
                               nbytes)
        t0 = time.perf_counter()
        remote_cls = ray.remote(UserStateShard)
        self.actors: list[Any] = []
        self._created: list[int] = []
        for i in range(n_shards):
            aname = f"{name}-{i}"
            try:
                ray.get_actor(aname, namespace=namespace)
                existed = True
            except ValueError:
                existed = False
            handle = remote_cls.options(
                name=aname, namespace=namespace, lifetime="detached", get_if_exists=True, max_restarts=-1,
                max_task_retries=0, num_cpus=0,
            ).remote(i, self.log_dir, vectorizer_factory, snapshot_every, history_len, n_shards=n_shards,
                     base_dir=base_dir)
            self.actors.append(handle)
            if not existed:
                self._created.append(i)
        from ray.exceptions import RayActorError

        try:  # waits for the shards' log replay; no retry here: a shard that cannot start should say why
            first = ray.get([a.stats.remote() for a in self.actors])
        except RayActorError as e:
            for i in self._created:  # do not leave detached half-stores behind
                ray.kill(self.actors[i], no_restart=True)
            raise RuntimeError(f"a state shard of {name!r} failed to start (cause below); if it says the log "
                               f"is locked, another store (another name=) writes {self.log_dir}") from e
        for i, st in enumerate(first):
            if os.path.abspath(st["log_dir"]) != self.log_dir or st["shard_id"] != i:
                for k in self._created:
                    ray.kill(self.actors[k], no_restart=True)
                raise ValueError(f"actor {name}-{i} in namespace {namespace!r} already exists for log_dir "
                                 f"{st['log_dir']!r} shard {st['shard_id']}, not {self.log_dir!r} shard {i}; "
                                 "pass the same log_dir or another name=")
        self.joined = [i for i in range(n_shards) if i not in self._created]
        logger.info("state store %r: %d shards ready (%d created, %d joined) on %s, %d users in %.2fs", name,
                    n_shards, len(self._created), len(self.joined), self.log_dir,
                    sum(st["n_users"] for st in first), time.perf_counter() - t0)

    def shard_of(self, user_id: str) -> int:
        return shard_of(user_id, self.n_shards)

    # ---- async API (Serve) -------------------------------------------------------------------------
    async def apply(self, events: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Apply feedback events; returns [{user_id, event_id, state_version, duplicate}] in input order."""
        groups = self._route(events)
        outs = await asyncio.gather(*(self._acall(s, "apply", [e for _, e in g]) for s, g in groups.items()))
        return self._merge(len(events), groups, outs)

    async def get(self, user_id: str) -> dict[str, Any] | None:
        return await self._acall(self._user_shard(user_id), "get", user_id)

    async def delete(self, user_id: str) -> bool:
        return await self._acall(self._user_shard(user_id), "delete", user_id)

    async def stats(self) -> dict[str, Any]:
        shards = await asyncio.gather(*(self._acall(i, "stats") for i in range(self.n_shards)))
        return _total(shards)

    async def set_base(self, data_dir: str | os.PathLike | None, poll_s: float = 0.2) -> list[dict[str, Any]]:
        """Hot swap: every shard loads its users from `data_dir` (None = no base) in the background while it
        keeps serving, then all commit (whole-log replay over the new base, a short pause per shard).
        Returns one `UserStateShard.commit_base` dict per shard."""
        d = None if data_dir is None else os.path.abspath(os.fspath(data_dir))
        shards = range(self.n_shards)
        status = await asyncio.gather(*(self._acall(i, "prepare_base", d) for i in shards))
        while not all(st["ready"] or not st["loading"] for st in status):
            await asyncio.sleep(poll_s)
            status = await asyncio.gather(*(self._acall(i, "base_status", d) for i in shards))
        return list(await asyncio.gather(*(self._acall(i, "commit_base", d) for i in shards)))

    # ---- sync twins (scripts, tests) ---------------------------------------------------------------
    def apply_sync(self, events: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        groups = self._route(events)
        outs = self._gather_sync("apply", [(s, ([e for _, e in g],)) for s, g in groups.items()])
        return self._merge(len(events), groups, outs)

    def get_sync(self, user_id: str) -> dict[str, Any] | None:
        return self._gather_sync("get", [(self._user_shard(user_id), (user_id,))])[0]

    def delete_sync(self, user_id: str) -> bool:
        return self._gather_sync("delete", [(self._user_shard(user_id), (user_id,))])[0]

    def stats_sync(self) -> dict[str, Any]:
        return _total(self._gather_sync("stats", [(i, ()) for i in range(self.n_shards)]))

    def set_base_sync(self, data_dir: str | os.PathLike | None, poll_s: float = 0.2) -> list[dict[str, Any]]:
        d = None if data_dir is None else os.path.abspath(os.fspath(data_dir))
        calls = [(i, (d,)) for i in range(self.n_shards)]
        status = self._gather_sync("prepare_base", calls)
        while not all(st["ready"] or not st["loading"] for st in status):
            time.sleep(poll_s)
            status = self._gather_sync("base_status", calls)
        return self._gather_sync("commit_base", calls)

    def snapshot_sync(self) -> list[dict[str, Any]]:
        return self._gather_sync("snapshot", [(i, ()) for i in range(self.n_shards)])

    def set_vectorizer_sync(self, vectorizer_factory: Callable[[], Any] | None) -> None:
        self._gather_sync("set_vectorizer", [(i, (vectorizer_factory,)) for i in range(self.n_shards)])

    def shutdown(self, kill_all: bool = False) -> None:
        """Kill the actors this store created (all `n_shards` with kill_all); their log and snapshots stay."""
        import ray

        which = range(self.n_shards) if kill_all else self._created
        for i in which:
            ray.kill(self.actors[i], no_restart=True)
        logger.info("state store %r: killed %d shard actor(s)", self.name, len(which))
        self._created = []

    # ---- internals ---------------------------------------------------------------------------------
    def _user_shard(self, user_id: str) -> int:
        if not isinstance(user_id, str) or not user_id:
            raise ValueError(f"user_id must be a non-empty string, got {user_id!r}")
        return shard_of(user_id, self.n_shards)

    def _route(self, events: Sequence[Mapping[str, Any]]) -> dict[int, list[tuple[int, dict[str, Any]]]]:
        """Validate every event here first (so no shard applies part of a bad batch), fix id and ts."""
        if isinstance(events, (Mapping, str, bytes)):
            raise ValueError(f"events must be a list of event dicts, got {type(events).__name__}")
        groups: dict[int, list[tuple[int, dict[str, Any]]]] = {}
        now = time.time()
        for i, e in enumerate(events):
            try:
                ev = e if isinstance(e, Event) else Event.from_dict(e, default_ts=now)
            except ValueError as err:
                raise ValueError(f"events[{i}]: {err}") from None
            if not ev.event_id:  # assigned before the first send, so a retry carries the same id
                ev = ev.with_id(uuid.uuid4().hex)
            groups.setdefault(shard_of(ev.user_id, self.n_shards), []).append((i, ev.to_dict()))
        return groups

    @staticmethod
    def _merge(n: int, groups: dict[int, list[tuple[int, dict[str, Any]]]],
               outs: Sequence[list]) -> list[dict]:
        res: list[dict[str, Any]] = [{}] * n
        for (_s, g), out in zip(groups.items(), outs):
            for (i, _e), r in zip(g, out):
                res[i] = r
        return res

    async def _acall(self, shard: int, method: str, *args: Any) -> Any:
        from ray.exceptions import RayActorError

        actor = self.actors[shard]
        try:
            return await getattr(actor, method).remote(*args)
        except RayActorError as e:
            logger.warning("shard %d %s failed (%s); waiting for the actor to restart, then retrying once",
                           shard, method, type(e).__name__)
            deadline = time.monotonic() + self.retry_timeout_s
            while True:
                try:
                    await actor.ping.remote()
                    break
                except RayActorError:
                    if time.monotonic() > deadline:
                        raise self._unavailable(shard) from e
                    await asyncio.sleep(0.1)
            return await getattr(actor, method).remote(*args)

    def _gather_sync(self, method: str, calls: Sequence[tuple[int, tuple]]) -> list[Any]:
        """Send all calls first (shards work in parallel), then collect each, retrying once after a crash."""
        import ray
        from ray.exceptions import RayActorError

        refs = [getattr(self.actors[s], method).remote(*args) for s, args in calls]
        out = []
        for (s, args), ref in zip(calls, refs):
            try:
                out.append(ray.get(ref))
            except RayActorError as e:
                logger.warning("shard %d %s failed (%s); waiting for the actor to restart, then retrying "
                               "once", s, method, type(e).__name__)
                self._wait_alive_sync(s, e)
                out.append(ray.get(getattr(self.actors[s], method).remote(*args)))
        return out

    def _wait_alive_sync(self, shard: int, cause: BaseException) -> None:
        import ray
        from ray.exceptions import RayActorError

        deadline = time.monotonic() + self.retry_timeout_s
        while True:
            try:
                ray.get(self.actors[shard].ping.remote())
                return
            except RayActorError:
                if time.monotonic() > deadline:
                    raise self._unavailable(shard) from cause
                time.sleep(0.1)

    def _unavailable(self, shard: int) -> RuntimeError:
        return RuntimeError(f"state shard {self.name}-{shard} did not come back within "
                            f"{self.retry_timeout_s}s after a crash; check `ray list actors` and the "
                            "shard's log")


def _total(shards: list[dict[str, Any]]) -> dict[str, Any]:
    return {"n_shards": len(shards), "n_users": sum(s["n_users"] for s in shards),
            "n_events": sum(s["n_events"] for s in shards),
            "n_base_users": sum(s["n_base_users"] for s in shards),
            "n_materialised": sum(s["n_materialised"] for s in shards), "shards": shards}


def _check_log_meta(log_dir: str, n_shards: int) -> None:
    from llmrec.artifacts import write_meta

    path = Path(log_dir) / META_FILE
    if path.is_file():
        meta = json.loads(path.read_text())
        if meta.get("stage") == "events" and meta.get("n_shards") != n_shards:
            raise ValueError(f"{log_dir} was written by a state store with n_shards={meta.get('n_shards')}, "
                             f"got n_shards={n_shards}; use the same n_shards (users are hashed to shards) "
                             "or a new log_dir")
        if meta.get("stage") != "events":
            raise ValueError(f"{path} belongs to a {meta.get('stage')!r} artifact; give the state store "
                             "its own log_dir (e.g. RUN/events)")
        return
    write_meta(log_dir, "events", n_shards=n_shards, hash="zlib.crc32(user_id utf-8) % n_shards",
               format="segmented JSONL, llmrec.state.event_log")
