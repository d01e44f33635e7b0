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
descriptor, the log's last seq), `tombstones-sNNN.jsonl` (`llmrec.state.tombstones`: one fsync'd line per
delete with a keyed hash of the user id, never the id, the log seq and the time of the delete) and `hash-key`
(the secret of those hashes, `llmrec.state.privacy`; shared by the shards). With `state_url` all of this
lives in Redis instead (`llmrec.state.backends`). On (re)start a shard loads its base; when the
snapshot was taken over the same base (equal `base.base_descriptor`: path, size, mtime, prepare fingerprint,
history_len) it loads the snapshot and replays the log records after its seq, else it replays the whole log
over the new base. A hot swap (`StateStore.set_base`) does the same: each shard loads the new base in a
background thread while it keeps serving from the old one, then commits (whole-log replay, swap,
snapshot). Snapshot users are kept as their JSON text and parsed on first read (`UserTable` in
`llmrec.state.table`), so a restart costs a scan of the snapshot lines plus the log tail, not one object
graph per user; after each full snapshot the users it wrote go back to that text unless they changed
meanwhile (`text_after_snapshot`), so memory follows the users active between full snapshots. Logged
events of a deleted user up to its tombstone are never replayed, and its base history is never loaded
again; a later event starts a fresh state. Vectors are not trusted from the snapshot (the vectorizer may
have changed): they are recomputed lazily on `get`.

`StateStore` creates (or joins) named detached actors `{name}-{i}` in `namespace` with `max_restarts=-1`
and `num_cpus=0`, routes calls by `shard_of`, and when an actor dies mid-call (`RayActorError`, which covers
`ActorDiedError` and `ActorUnavailableError`) waits up to `retry_timeout_s` (5 s) for Ray to restart it and
sends the same call once more (the client assigns event ids BEFORE the first send, so the retry is
idempotent); a shard that stays down, or does not answer a call within `call_timeout_s` (10 s; not for base
loads), is `StateUnavailable` (HTTP 503 + Retry-After) at once instead of a long wait and a 500.

Choices the design leaves open:
- `log_dir/meta.json` (stage "events") records `n_shards`; a store with another `n_shards` on the same
  folder is refused (users would map to other shards than their logged events).
- Joining existing actors whose `log_dir` differs from ours is refused (pass the same folder or another name).
- `delete` writes the tombstone, removes the user from memory, writes a snapshot, then rewrites the log
  segments without the user (a crash before that last step is finished at the next start).
- `get` returns a `user_state.StateSummary` (text_feedback entries carry their `vec`; the user `vector`
  (list[float] or None) and `shard` set); `n_events` / `version` of a base user count its base events.
- A shard Ray restarts after a crash keeps the base its snapshot names (a `set_base` after the constructor).
- The vectorizer factory should be small (a path, not arrays): Ray stores constructor arguments over ~100 KB
  in the object store, where a detached actor's restart can no longer find them once the creating driver is
  gone (ray-project/ray#53727). `EmbeddingsMeanVectorizer(embeddings_dir)` is the small production factory.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import json
import logging
import os
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmrec.artifacts import atomic_write
from llmrec.schema import META_FILE
from llmrec.state.backends import open_backend
from llmrec.state.base import BaseHistories, base_descriptor, load_base
from llmrec.state.errors import InvalidEvent, StateUnavailable
from llmrec.state.privacy import UserKeyer
from llmrec.state.table import UserTable
from llmrec.state.tombstones import Tombstones
from llmrec.state.user_state import (
    Event,
    MeanVectorizer,
    StateSummary,
    UserState,
    apply_event,
    new_event_id,
    state_to_dict,
    summary,
)

logger = logging.getLogger(__name__)

__all__ = ["StateStore", "UserStateShard", "shard_of", "EmbeddingsMeanVectorizer"]



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
        log_retention_s: after each snapshot, delete log segments the snapshot covers that were last written
            more than this many seconds ago. None = keep the whole log (training reads it: `llmrec train
            --events`). A hot swap (`set_base`) replays only what the log still holds over the new base, so
            set it only when each new run's data includes the log up to that horizon.
        hash_key_file: the secret of the keyed user-id hashes (tombstones, log lines); default
            `log_dir/hash-key`, created on first use.
        background: snapshots and the log purges of deletes run in a background thread (checked every
            `purge_interval_s`), off the request path; False = inline, when due (deterministic, for tests and
            tools).
        purge_interval_s: how often the background thread looks for due work; a delete reaches the log and
            snapshot files within about this long (many deletes share one pass).
        full_every: a full snapshot after this many deltas (deltas hold only the users changed since).
        applied_len: event ids kept per user for de-duplication (`UserState.applied_len`).
        state_url: keep the log, snapshots and tombstones in Redis (`llmrec.state.backends.RedisBackend`,
            redis://...) instead of files in log_dir, so a shard restarted on another node finds them.
        text_after_snapshot: after a full snapshot, users unchanged since it was captured are kept as its
            text and parsed again on their next read (`UserTable.to_text`): memory follows the users active
            between full snapshots, not all users. False = parsed users stay objects.
    """

    def __init__(self, shard_id: int, log_dir: str, vectorizer_factory: Callable[[], Any] | None = None,
                 snapshot_every: int = 1000, history_len: int = 200, *, n_shards: int | None = None,
                 base_dir: str | None = None, log_retention_s: float | None = None,
                 hash_key_file: str | None = None, background: bool = True, purge_interval_s: float = 1.0,
                 full_every: int = 16, applied_len: int = 1000, state_url: str | None = None,
                 text_after_snapshot: bool = True) -> None:
        t0 = time.perf_counter()
        self.applied_len = int(applied_len)
        self.text_after_snapshot = bool(text_after_snapshot)
        self.log_retention_s = None if log_retention_s is None else float(log_retention_s)
        if snapshot_every < 1:
            raise ValueError(f"snapshot_every must be >= 1, got {snapshot_every}")
        self.shard_id = int(shard_id)
        self.log_dir = str(log_dir)
        Path(self.log_dir).mkdir(parents=True, exist_ok=True)
        self.n_shards = n_shards
        self.snapshot_every = int(snapshot_every)
        self.history_len = int(history_len)
        # the durable side: files in log_dir (default) or Redis (state_url); `self.log` is that backend
        self.log = open_backend(self.log_dir, self.shard_id, state_url, hash_key_file=hash_key_file,
                                owner=_actor_name())
        self.keyer = UserKeyer(self.log.hash_key())
        with cyclic_gc_paused():  # the bulk load: snapshot, base, log replay
            snap, parts = self.log.read_snapshots()
            # deleted users, by keyed hash (never the ids): log seq and time of the latest delete
            self.tombstones = Tombstones(self.log, self.keyer, (snap or {}).get("tombstones"))
            snap_seq = int(snap["last_seq"]) if snap else 0
            self.log.open_log(max(snap_seq, self.tombstones.max_seq()) + 1)
            if self.tombstones.pending:
                self._finish_deletes(set(self.tombstones.pending))
            self.base: BaseHistories | None = None
            self.base_info: dict[str, Any] = {}
            self._pending: dict[str, Any] | None = None  # a base loading in the background (prepare_base)
            self._set_loaded_base(self._load_base(self._base_dir_at_start(base_dir, snap)))
            self.users = UserTable()  # snapshot users stay unparsed text until first touched
            after = 0
            if snap is not None and snap.get("base") == self._base_desc():
                for part_seq, users in parts:  # the full snapshot, then each newer delta
                    for uid, d in users.items():
                        # a user deleted at or after the part's seq (a crash before the delete's own snapshot)
                        if self.tombstones.seq(uid) < part_seq:
                            self.users.put(uid, d)
                after = snap_seq
            elif snap is not None:
                logger.info("shard %d: the base changed since the snapshot (%s -> %s): replaying the whole "
                            "log over the new base", self.shard_id, _short(snap.get("base")),
                            _short(self._base_desc()))
            self.replay_counts = self._replay(self.users, self.base, after)
            self.replayed = self.replay_counts["replayed"]
        self._since_snapshot = self.replayed
        self._snapshot_failures = 0
        self._snapshot_error: str | None = None
        self._snapshot_retry_at = 0.0
        self._snapshot_backoff_s = 0.0
        self._last_snapshot: dict[str, Any] = {}
        self._recount()
        self.vectorizer = vectorizer_factory() if vectorizer_factory is not None else None
        self._dirty: set[str] = set(self.users)  # users whose vector must be recomputed
        # snapshot / purge work (the background thread takes it under _mu, writes it without)
        self._mu = threading.RLock()
        self._job_lock = threading.Lock()  # one snapshot job at a time
        self._snap_dirty: set[str] = set(self.users) if self.replayed else set()  # changed since a snapshot
        self._purge: dict[str, tuple[int, str]] = {}  # deleted user -> (tombstone seq, key): log purge due
        self._need_full = False  # a delete removed a user that snapshot files may hold
        self._purges_in_flight = 0
        self._written = {"full": 0, "delta": 0}  # snapshot files written by this process
        self._purged_users_total = 0
        self._has_full, self._n_deltas = self.log.snapshot_info()
        self.full_every = int(full_every)
        self.purge_interval_s = float(purge_interval_s)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._worker: threading.Thread | None = None
        if background:
            self._worker = threading.Thread(target=self._snapshot_loop, daemon=True,
                                            name=f"llmrec-shard-{self.shard_id}-snapshots")
            self._worker.start()
        logger.info("shard %d ready: %d users (%d from the base only, %d materialised, %d of them parsed), "
                    "snapshot seq %d + replay %s in %.2fs", self.shard_id, self._n_users(), self._n_base_live,
                    len(self.users), self.users.n_parsed, snap_seq, self.replay_counts,
                    time.perf_counter() - t0)

    # ---- API -----------------------------------------------------------------------------------------
    def apply(self, events: Sequence[Mapping[str, Any] | Event]) -> list[dict[str, Any]]:
        """Validate all (dicts in full; an `Event` is typed and validated already, so only its shard and its
        text_vec dimension are checked), de-duplicate, log with fsync, then update memory and vectors.

        Duplicates (answered `duplicate: true`, neither logged nor applied): an event id already applied to
        that user or repeated for that user in the batch, and an item event equal to one of the user's base
        events on (item_id, event, ts) (`BaseHistories.has_event`). Events of a deleted user stamped before
        the delete (a retry or an event in flight) are refused too (`deleted: true`;
        `llmrec.state.tombstones`).

        Returns:
            one dict per input event, in order: {user_id, event_id, state_version, duplicate, deleted}.
        Raises:
            InvalidEvent: an event is invalid or belongs to another shard (nothing is applied then).
            StateUnavailable: the log write failed (nothing is applied then).
        """
        evs = [self._validate(i, e) for i, e in enumerate(events)]
        with self._mu:
            return self._apply_valid(evs)

    def _apply_valid(self, evs: list[Event]) -> list[dict[str, Any]]:
        batch_ids: set[tuple[str, str]] = set()
        new: list[Event] = []
        flags: list[tuple[bool, bool]] = []  # (duplicate, deleted)
        for ev in evs:
            key = (ev.user_id, ev.event_id)
            dup = key in batch_ids or self._duplicate(self.users, self.base, ev) is not None
            gone = not dup and self.tombstones.blocks(ev.user_id, ev.ts)
            batch_ids.add(key)
            flags.append((dup, gone))
            if not (dup or gone):
                new.append(ev)
        self.log.append(new)  # durable before memory changes and before we reply
        versions: dict[tuple[str, str], int] = {}
        for ev in new:
            versions[(ev.user_id, ev.event_id)] = self._fold(self.users, self.base, ev, count=True).version
        touched = {ev.user_id for ev in new}
        for uid in touched:
            self._refresh_vector(uid)
        self._snap_dirty |= touched
        self._since_snapshot += len(new)
        self._maybe_snapshot()
        return [
            {"user_id": ev.user_id, "event_id": ev.event_id, "duplicate": dup, "deleted": gone,
             "state_version": self._version(ev.user_id) if (dup or gone) else versions[(ev.user_id,
                                                                                          ev.event_id)]}
            for ev, (dup, gone) in zip(evs, flags, strict=True)
        ]

    def get(self, user_id: str) -> StateSummary | None:
        """The user's `StateSummary` (text feedback with its vectors, the user vector, this shard's id); None
        for an unknown user. A base-only user gets a transient state from the arrays.

        Under the state lock: the snapshot thread turns written users back into text under it
        (`UserTable.to_text`), and a read in the middle of that would find the user in neither form."""
        with self._mu:
            st = self.users.get(user_id)
            if st is not None:
                if user_id in self._dirty:
                    self._refresh_vector(user_id)
                    st = self.users[user_id]
                return summary(st, vector=st.vector, shard=self.shard_id)
            r = self._base_row(self.base, user_id)
            if r is None:
                return None
            st = self.base.state(r, history_len=self.history_len)  # type: ignore[union-attr]
            vec = self.vectorizer(st) if self.vectorizer is not None else None
            return summary(st, vector=vec, shard=self.shard_id)

    def delete(self, user_id: str) -> bool:
        """Forget a user: a durable tombstone first (its base history is never loaded again, its logged
        events up to now are never replayed, its events stamped before now are refused), then memory; its
        logged events and its state in snapshot files are removed by the next snapshot pass (within about
        `purge_interval_s` in the background; many deletes share one pass). True if anything was removed.

        A user this shard does not know (not materialised, not in the base, no base loading) costs nothing:
        no tombstone, no snapshot, no log scan (every logged event materialises its user, so such a user
        has no logged events)."""
        if not isinstance(user_id, str) or not user_id:
            raise InvalidEvent(f"user_id must be a non-empty string, got {user_id!r}")
        with self._mu:
            r = self._base_row(self.base, user_id)
            if user_id not in self.users and r is None and self._pending is None:
                return False
            key = self.tombstones.add(user_id, self.log.last_seq)
            gone_events = self.users.discard(user_id)  # a user still as snapshot text is not parsed for it
            if gone_events is not None:
                self._n_events -= gone_events
                # its logged events and its state in snapshot files go in the next background pass
                self._purge[user_id] = (self.tombstones.seq(user_id), key)
                self._need_full = True
                self._snap_dirty.discard(user_id)
            else:
                self.tombstones.mark_purged(key)  # nothing logged (every logged event materialises its user)
                if r is not None:  # a base-only user
                    self._n_base_live -= 1
                    self._n_events -= int(self.base.n_total[r])  # type: ignore[union-attr]
            if r is not None:
                self.base.hidden.add(r)  # type: ignore[union-attr]  # the arrays keep it until the next load
            if self._pending is not None:  # a base loading in the background may hold the user too
                self._pending["deleted"].append(user_id)
            self._dirty.discard(user_id)
        logger.info("shard %d: deleted user %s (in memory: %s, in the base: %s)", self.shard_id,
                    self.keyer.log_id(user_id), gone_events is not None, r is not None)
        self._maybe_snapshot()
        return gone_events is not None or r is not None

    def log_key(self) -> bytes:
        """The derived key of the keyed user ids in log lines (`UserKeyer.for_logs`), for the ingress."""
        return self.keyer.log_key()

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
            deleted = self.tombstones.matcher()
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
        users = UserTable()
        with cyclic_gc_paused():
            counts = self._replay(users, new_base, 0)
        with self._mu:
            self._set_loaded_base(loaded)
            self.users = users
            self._recount()
            self._dirty = set(users)
            self._need_full = True  # the snapshot must name the new base
        # now, not in the background: a shard Ray restarts takes its base from the snapshot
        with self._job_lock:
            job = self._capture(full=True)
            self._run_job(job)
        logger.info("shard %d: base swapped to %s: %d users; log replay %s in %.2fs", self.shard_id,
                    data_dir, self._n_users(), counts, time.perf_counter() - t1)
        return {"shard": self.shard_id, "changed": True, "base": self.base_info, "replay": counts,
                "commit_s": time.perf_counter() - t1, "wall_s": time.perf_counter() - t0}

    def stats(self) -> dict[str, Any]:
        return {
            "shard_id": self.shard_id, "n_users": self._n_users(),
            "n_events": self._n_events, "n_base_users": self._n_base_live, "n_materialised": len(self.users),
            "n_parsed": self.users.n_parsed,  # materialised users held as objects (the rest: snapshot text)
            "n_tombstones": len(self.tombstones), "base": self.base_info, "last_seq": self.log.last_seq,
            "log_dir": self.log_dir, "replayed_at_start": self.replayed,
            "since_snapshot": self._since_snapshot, "pid": os.getpid(),
            "snapshot_failures": self._snapshot_failures, "snapshot_error": self._snapshot_error,
            "last_snapshot": dict(self._last_snapshot),
            "pending_purges": len(self._purge) + self._purges_in_flight,  # deletes not yet off disk
            "snapshots_written": dict(self._written), "purged_users": self._purged_users_total,
            "purge_worker": self.log.purge_stats(),  # the child process the log purges run in (both backends)
            "resources": _assigned_resources(),
        }

    def snapshot(self) -> dict[str, Any]:
        """Write a full snapshot now (materialised users, tombstones, base descriptor, the log's last seq) and
        finish pending log purges; waits for a background pass in progress. Base-only users are not in it:
        the base file is.

        Raises:
            OSError: the write failed (the previous snapshot stays whole, the temporary file is removed).
        """
        with self._job_lock:
            job = self._capture(full=True)
            return self._run_job(job, raise_errors=True)

    def _maybe_snapshot(self) -> None:
        """Snapshot work is due after `snapshot_every` events, after a delete or a base swap. In background
        mode the thread is woken (events) or finds it on its next round (deletes: batched); inline, it runs
        now. It never fails the caller: the events are in the log already, a failed snapshot only makes the
        next recovery replay more of it."""
        if self._worker is not None:
            if self._since_snapshot >= self.snapshot_every:
                self._wake.set()
            return
        with self._job_lock:
            job = self._capture()
            if job is not None:
                self._run_job(job)

    def _snapshot_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.purge_interval_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            with self._job_lock:
                try:
                    job = self._capture()
                    if job is not None:
                        self._run_job(job)
                except Exception:  # noqa: BLE001 - the thread must survive anything; _run_job records errors
                    logger.exception("shard %d: snapshot thread error", self.shard_id)

    def _capture(self, full: bool = False) -> dict[str, Any] | None:
        """Take the due work under the state lock (O(changed users); a full snapshot copies the dict of
        users, whose states are immutable values); None when nothing is due or a failure's backoff runs."""
        with self._mu:
            due = full or self._purge or self._need_full or self._since_snapshot >= self.snapshot_every
            if not due or (not full and time.monotonic() < self._snapshot_retry_at):
                return None
            full = full or self._need_full or bool(self._purge) or not self._has_full \
                or self._n_deltas >= self.full_every
            if full:
                users = self.users.copy()
            else:
                users = UserTable()
                for u in self._snap_dirty:
                    if u in self.users:
                        users[u] = self.users[u]
            job = {"full": full, "users": users, "last_seq": self.log.last_seq, "base": self._base_desc(),
                   "tombstones": self.tombstones.to_json(), "purge": self._purge,
                   "since": self._since_snapshot}
            self._snap_dirty, self._purge, self._need_full, self._since_snapshot = set(), {}, False, 0
            return job

    def _run_job(self, job: dict[str, Any], raise_errors: bool = False) -> dict[str, Any]:
        """Purge deleted users from the log, then write the snapshot (full: and drop the deltas it covers),
        then retire old segments. On failure the work goes back to the queue and the next try waits (1 s,
        doubling up to 60 s), so a full disk is not hammered."""
        t0 = time.perf_counter()
        seq = job["last_seq"]
        self._purges_in_flight = len(job["purge"])
        try:
            purge = {u: s for u, (s, _k) in job["purge"].items()}
            purged = self.log.forget_users(purge) if purge else 0
            header = {"kind": "full" if job["full"] else "delta", "shard": self.shard_id, "last_seq": seq,
                      "created_at": time.time(), "base": job["base"], "tombstones": job["tombstones"]}
            written: dict[str, Any] | None = {} if job["full"] and self.text_after_snapshot else None
            items = job["users"].snapshot_items(_snapshot_dict, written)
            nbytes = self.log.write_snapshot(job["full"], header, items)
            if job["full"]:
                self._has_full, self._n_deltas = True, 0
            else:
                self._n_deltas += 1
            for _u, (_s, key) in job["purge"].items():
                self.tombstones.mark_purged(key)
            if self.log_retention_s is not None:
                self.log.retire(seq, self.log_retention_s)
        except Exception as e:
            with self._mu:  # the work goes back; newer changes stay queued too
                self._snap_dirty |= set(job["users"]) if not job["full"] else set(self.users)
                for u, v in job["purge"].items():
                    self._purge.setdefault(u, v)
                self._need_full = self._need_full or job["full"]
                self._since_snapshot += job["since"]
                self._snapshot_failures += 1
                self._snapshot_error = f"{type(e).__name__}: {e}"
                self._snapshot_backoff_s = min(60.0, max(1.0, 2 * self._snapshot_backoff_s))
                self._snapshot_retry_at = time.monotonic() + self._snapshot_backoff_s
            logger.error("shard %d: snapshot failed (%s); serving goes on from the log, next try in %.0fs",
                         self.shard_id, self._snapshot_error, self._snapshot_backoff_s)
            self._purges_in_flight = 0
            if raise_errors:
                raise
            return {"error": self._snapshot_error}
        self._snapshot_error, self._snapshot_retry_at, self._snapshot_backoff_s = None, 0.0, 0.0
        if written:
            with self._mu:  # the written users unchanged since: their text replaces their objects
                self._dirty.update(self.users.to_text(written))  # vectors are recomputed on the next read
        dt = time.perf_counter() - t0
        self._last_snapshot = {"kind": header["kind"], "last_seq": seq, "n_users": len(job["users"]),
                               "bytes": nbytes, "wall_s": round(dt, 4), "purged_events": purged,
                               "purged_users": len(job["purge"])}
        self._written[header["kind"]] += 1
        self._purged_users_total += len(job["purge"])
        self._purges_in_flight = 0  # after _last_snapshot: a reader that sees 0 sees this pass's result
        logger.info("shard %d: %s snapshot of %d users at seq %d (%d bytes, %d users purged) in %.3fs",
                    self.shard_id, header["kind"], len(job["users"]), seq, nbytes, len(job["purge"]), dt)
        return {"where": self.log.describe(), **self._last_snapshot}

    def set_vectorizer(self, vectorizer_factory: Callable[[], Any] | None) -> int:
        """Swap the vectorizer (e.g. a new scorer); every vector is recomputed on its next `get`."""
        vectorizer = vectorizer_factory() if vectorizer_factory is not None else None
        with self._mu:  # beside the snapshot thread, which marks the users it turned back into text
            self.vectorizer = vectorizer
            self._dirty = set(self.users)
            return len(self._dirty)

    def ping(self) -> int:
        return self.shard_id

    def close(self) -> None:
        """Stop the snapshot thread, finish pending deletes (log purge + snapshot), release the log (its file
        lock); only needed when used as a plain object (tests, tools)."""
        self._stop.set()
        self._wake.set()
        if self._worker is not None:
            self._worker.join(timeout=60)
        if self._purge:
            with self._job_lock:
                job = self._capture(full=True)
                self._run_job(job)
        self.log.close()

    # ---- internals -----------------------------------------------------------------------------------
    def _new_state(self, user_id: str) -> UserState:
        return UserState(user_id=user_id, history_len=self.history_len, applied_len=self.applied_len)

    def _base_row(self, base: BaseHistories | None, user_id: str) -> int | None:
        """The user's row in `base`, unless there is no base or the user was deleted."""
        return None if base is None else base.row(user_id)

    def _duplicate(self, users: UserTable, base: BaseHistories | None, ev: Event) -> str | None:
        """"id" (event id already applied), "base" (equals a base event of the user), or None (new)."""
        st = users.get(ev.user_id)
        if st is not None and st.has_applied(ev.event_id):
            return "id"
        if ev.item_id is not None:
            r = self._base_row(base, ev.user_id)
            if r is not None and base.has_event(r, ev.item_id, ev.event, ev.ts):  # type: ignore[union-attr]
                return "base"
        return None

    def _fold(self, users: UserTable, base: BaseHistories | None, ev: Event, *,
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

    def _replay(self, users: UserTable, base: BaseHistories | None, after_seq: int
                ) -> dict[str, int]:
        """Fold this shard's log records with seq > after_seq into `users` (over `base`), skipping invalid
        records, duplicates and the events of deleted users up to their tombstone."""
        c = {"replayed": 0, "duplicate_id": 0, "duplicate_base": 0, "deleted": 0, "invalid": 0}
        counters: dict[str, int] = {}
        for rec in self.log.records(after_seq=after_seq, counters=counters):
            fields = {k: v for k, v in rec.items() if k not in ("seq", "shard")}
            try:
                ev = Event.from_dict(fields)
            except ValueError as e:
                c["invalid"] += 1
                logger.error("shard %d: log record seq %s is invalid, skipped: %s", self.shard_id,
                             rec["seq"], str(e).split(":")[0][:80])  # the field, not the values (user ids)
                continue
            if rec["seq"] <= self.tombstones.seq(ev.user_id) or self.tombstones.blocks(ev.user_id, ev.ts):
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
        after its tombstone: the tombstone names a keyed hash, so the log's user ids are hashed to find
        them."""
        found: dict[str, int] = {}
        checked: set[str] = set()
        for rec in self.log.records():
            uid = rec.get("user_id")
            if isinstance(uid, str) and uid not in checked:
                checked.add(uid)
                if self.keyer.tombstone_key(uid) in pending:
                    found[uid] = self.tombstones.seq(uid)
        n = self.log.forget_users(found) if found else 0
        for h in pending:
            self.tombstones.mark_purged(h)
        logger.warning("shard %d: finished %d interrupted delete(s): purged %d logged events", self.shard_id,
                       len(pending), n)

    def _recount(self) -> None:
        """Recompute the O(1) counters after a (re)build: users/events from the base only + materialised."""
        base = self.base
        self._n_events = self.users.n_events()
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
        return ev if ev.event_id else ev.with_id(new_event_id(ev, client_ts=_has_ts(e)))

    def _refresh_vector(self, user_id: str) -> None:
        st = self.users[user_id]
        vec = self.vectorizer(st) if self.vectorizer is not None else None
        st.vector = None if vec is None else np.asarray(vec, dtype=np.float32)  # 1.5 KB, not a 12 KB list
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

    def _load_pending(self, p: dict[str, Any], deleted: Callable[[str], bool] | None) -> None:
        try:
            p["result"] = self._load_base(p["data_dir"], deleted)
        except Exception as e:  # noqa: BLE001 - reported by commit_base, in the caller's process
            logger.exception("shard %d: loading the base %s failed", self.shard_id, p["data_dir"])
            p["error"] = f"{type(e).__name__}: {e}"
        finally:
            p["done"].set()

    def _load_base(self, data_dir: str | os.PathLike | None, deleted: Callable[[str], bool] | None = None
                   ) -> tuple[BaseHistories, dict[str, Any]] | None:
        if data_dir is None:
            return None
        if deleted is None:
            deleted = self.tombstones.matcher()
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

def _actor_name() -> str | None:
    """This actor's name (a restarted actor has the same one), None outside an actor."""
    try:
        import ray

        if ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None:
            return ray.get_runtime_context().get_actor_name() or None
    except Exception:  # noqa: BLE001
        pass
    return None


def _assigned_resources() -> dict[str, float]:
    """What Ray reserved for this actor (e.g. {"memory": bytes}); {} outside an actor."""
    try:
        import ray

        if ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None:
            return dict(ray.get_runtime_context().get_assigned_resources())
    except Exception:  # noqa: BLE001 - stats only
        pass
    return {}


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


def _short(desc: dict[str, Any] | None) -> str:
    if desc is None:
        return "none"
    return f"{desc['path']} ({desc['size']} B, fingerprint {desc['prepare_fingerprint']})"


@dataclass(frozen=True)
class EmbeddingsMeanVectorizer:
    """Picklable zero-arg vectorizer factory: loads the embeddings folder (either layout) inside the actor.

    The item matrix (N, D) float32 is shared by every shard on a node, not copied per shard: the first shard
    writes it once as a `.npy` file in `shared_dir` (default: the node's temp dir, `llmrec-item-vectors/`,
    named by the embeddings' path and meta.json) and every shard memory-maps it, so the OS keeps one copy
    in its page cache. (A memory map rather than Ray's object store: a detached shard that Ray restarts
    after its creator is gone cannot get objects back from the store, but it can map a file.)

    Example::

        store = StateStore(4, "RUN/events", vectorizer_factory=EmbeddingsMeanVectorizer("RUN/embeddings"))
    """

    embeddings_dir: str
    half_life: float = 20.0
    negative_weight: float = 0.5
    text_weight: float = 0.5
    shared_dir: str | None = None

    def __call__(self) -> MeanVectorizer:
        import tempfile

        from llmrec.embed.artifact import load_embeddings  # checks the file against its meta.json

        meta_path = Path(self.embeddings_dir) / META_FILE
        if not meta_path.is_file():
            load_embeddings(self.embeddings_dir)  # raises the artifact error that says what to run
        meta = meta_path.read_bytes()
        key = hashlib.sha256(os.path.abspath(self.embeddings_dir).encode() + meta).hexdigest()[:20]
        cache = Path(self.shared_dir or Path(tempfile.gettempdir()) / "llmrec-item-vectors")
        vec_path, ids_path = cache / f"{key}.npy", cache / f"{key}.ids.npy"
        if not (vec_path.is_file() and ids_path.is_file()):
            emb = load_embeddings(self.embeddings_dir)
            cache.mkdir(parents=True, exist_ok=True)
            for path, arr in ((ids_path, np.asarray(emb.item_ids).astype(str)),
                              (vec_path, np.ascontiguousarray(emb.vectors, np.float32))):
                # atomic: another shard maps either nothing or the whole file
                atomic_write(path, lambda tmp, arr=arr: np.save(tmp, arr))
        vectors = np.load(vec_path, mmap_mode="r")  # (N, D) float32, shared through the page cache
        item_ids = np.load(ids_path)
        return MeanVectorizer(item_ids, vectors, half_life=self.half_life,
                              negative_weight=self.negative_weight, text_weight=self.text_weight)


class StateStore:
    """Client facade over `n_shards` named detached `UserStateShard` actors.

    Async methods (`apply`, `get`, `delete`, `stats`) are for Serve replicas; `*_sync` twins for scripts.
    Joining running actors (same `name` and `namespace`) keeps their vectorizer and settings; use
    `set_vectorizer_sync` to swap the vectorizer.

    Example::

        store = StateStore(n_shards=2, log_dir="RUN/events")
        store.apply_sync([{"user_id": "u1", "item_id": "i9", "event": "like"}])
        store.get_sync("u1").n_events  # 1
        store.shutdown()
    """

    def __init__(self, n_shards: int = 4, log_dir: str | os.PathLike | None = None, namespace: str = "llmrec",
                 vectorizer_factory: Callable[[], Any] | None = None, name: str = "llmrec-state", *,
                 snapshot_every: int = 1000, history_len: int = 200, retry_timeout_s: float = 5.0,
                 call_timeout_s: float = 10.0,
                 base_dir: str | os.PathLike | None = None, log_retention_s: float | None = None,
                 shard_memory_mb: int | None = 256, applied_len: int = 1000, state_url: str | None = None
                 ) -> None:
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
        self.call_timeout_s = float(call_timeout_s)
        base_dir = None if base_dir is None else os.path.abspath(os.fspath(base_dir))
        _check_log_meta(self.log_dir, n_shards)
        if state_url:
            _check_redis_meta(state_url, n_shards)
        if vectorizer_factory is not None:
            from ray import cloudpickle

            nbytes = len(cloudpickle.dumps(vectorizer_factory))
            if nbytes > 100_000:  # Ray then keeps the actor's constructor args in the object store
                logger.warning("vectorizer_factory pickles to %d bytes; a restarted detached shard needs its "
                               "constructor args, which Ray keeps only while this driver lives: pass a small "
                               "factory that loads the data itself (e.g. EmbeddingsMeanVectorizer(dir))",
                               nbytes)
        t0 = time.perf_counter()
        # a memory reservation per shard: Ray then places shards only where that much memory is free (and
        # counts it against the node), instead of packing them onto one node until it runs out
        mem = {"memory": int(shard_memory_mb) << 20} if shard_memory_mb else {}
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
                max_task_retries=0, num_cpus=0, **mem,
            ).remote(i, self.log_dir, vectorizer_factory, snapshot_every, history_len, n_shards=n_shards,
                     base_dir=base_dir, log_retention_s=log_retention_s, applied_len=applied_len,
                     state_url=state_url)
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
    async def apply(self, events: Sequence[Mapping[str, Any] | Event]) -> list[dict[str, Any]]:
        """Apply feedback events (typed `Event`s, or dicts validated here); returns [{user_id, event_id,
        state_version, duplicate, deleted}] in input order."""
        groups = self._route(events)
        outs = await asyncio.gather(*(self._acall(s, "apply", [e for _, e in g]) for s, g in groups.items()))
        return self._merge(len(events), groups, outs)

    async def get(self, user_id: str) -> StateSummary | None:
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
    def apply_sync(self, events: Sequence[Mapping[str, Any] | Event]) -> list[dict[str, Any]]:
        groups = self._route(events)
        outs = self._gather_sync("apply", [(s, ([e for _, e in g],)) for s, g in groups.items()])
        return self._merge(len(events), groups, outs)

    def get_sync(self, user_id: str) -> StateSummary | None:
        return self._gather_sync("get", [(self._user_shard(user_id), (user_id,))])[0]

    def delete_sync(self, user_id: str) -> bool:
        return self._gather_sync("delete", [(self._user_shard(user_id), (user_id,))])[0]

    def log_key_sync(self) -> bytes:
        """The key of the keyed user ids the shards log (`UserKeyer.for_logs`); the same for every shard."""
        return self._gather_sync("log_key", [(0, ())])[0]

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

    def _route(self, events: Sequence[Mapping[str, Any] | Event]) -> dict[int, list[tuple[int, Event]]]:
        """Typed events by shard. An `Event` (the ingress validated it) is passed on as it is; a dict
        (scripts) is validated here, once, so no shard applies part of a bad batch. Ids and ts are fixed
        here."""
        if isinstance(events, (Mapping, str, bytes)):
            raise ValueError(f"events must be a list of event dicts, got {type(events).__name__}")
        groups: dict[int, list[tuple[int, Event]]] = {}
        now = time.time()
        for i, e in enumerate(events):
            try:
                ev = e if isinstance(e, Event) else Event.from_dict(e, default_ts=now)
            except ValueError as err:
                raise ValueError(f"events[{i}]: {err}") from None
            if not ev.event_id:  # assigned before the first send, so a retry carries the same id
                ev = ev.with_id(new_event_id(ev, client_ts=_has_ts(e)))
            groups.setdefault(shard_of(ev.user_id, self.n_shards), []).append((i, ev))
        return groups

    @staticmethod
    def _merge(n: int, groups: dict[int, list[tuple[int, Event]]], outs: Sequence[list]) -> list[dict]:
        res: list[dict[str, Any]] = [{}] * n
        for (_s, g), out in zip(groups.items(), outs, strict=True):
            for (i, _e), r in zip(g, out, strict=True):
                res[i] = r
        return res

    async def _acall(self, shard: int, method: str, *args: Any) -> Any:
        """Call a shard; a dead or stuck shard becomes `StateUnavailable` (HTTP 503) within seconds, not a
        minute-long wait and a 500. A shard that died is waited for (`retry_timeout_s`) and called once
        more."""
        from ray.exceptions import GetTimeoutError, RayActorError

        actor = self.actors[shard]
        timeout = None if method in _LONG_CALLS else self.call_timeout_s
        try:
            return await asyncio.wait_for(getattr(actor, method).remote(*args), timeout)
        except (asyncio.TimeoutError, GetTimeoutError):
            raise self._unavailable(shard, f"did not answer {method} within {timeout}s") from None
        except RayActorError as e:
            logger.warning("shard %d %s failed (%s); waiting up to %.0fs for the actor to restart, then "
                           "retrying once", shard, method, type(e).__name__, self.retry_timeout_s)
            deadline = time.monotonic() + self.retry_timeout_s
            while True:
                left = deadline - time.monotonic()
                try:
                    await asyncio.wait_for(actor.ping.remote(), max(0.1, left))
                    break
                except (RayActorError, asyncio.TimeoutError, GetTimeoutError):
                    if time.monotonic() > deadline:
                        raise self._unavailable(shard) from e
                    await asyncio.sleep(0.1)
            try:
                return await asyncio.wait_for(getattr(actor, method).remote(*args), timeout)
            except (RayActorError, asyncio.TimeoutError, GetTimeoutError):
                raise self._unavailable(shard) from e

    def _gather_sync(self, method: str, calls: Sequence[tuple[int, tuple]]) -> list[Any]:
        """Send all calls first (shards work in parallel), then collect each, retrying once after a crash."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        timeout = None if method in _LONG_CALLS else self.call_timeout_s
        refs = [getattr(self.actors[s], method).remote(*args) for s, args in calls]
        out = []
        for (s, args), ref in zip(calls, refs, strict=True):
            try:
                out.append(ray.get(ref, timeout=timeout))
            except GetTimeoutError:
                raise self._unavailable(s, f"did not answer {method} within {timeout}s") from None
            except RayActorError as e:
                logger.warning("shard %d %s failed (%s); waiting for the actor to restart, then retrying "
                               "once", s, method, type(e).__name__)
                self._wait_alive_sync(s, e)
                try:
                    out.append(ray.get(getattr(self.actors[s], method).remote(*args), timeout=timeout))
                except (RayActorError, GetTimeoutError):
                    raise self._unavailable(s) from e
        return out

    def _wait_alive_sync(self, shard: int, cause: BaseException) -> None:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        deadline = time.monotonic() + self.retry_timeout_s
        while True:
            try:
                ray.get(self.actors[shard].ping.remote(), timeout=max(0.1, deadline - time.monotonic()))
                return
            except (RayActorError, GetTimeoutError):
                if time.monotonic() > deadline:
                    raise self._unavailable(shard) from cause
                time.sleep(0.1)

    def _unavailable(self, shard: int, why: str | None = None) -> StateUnavailable:
        why = why or f"did not come back within {self.retry_timeout_s}s after a crash"
        return StateUnavailable(f"state shard {self.name}-{shard} {why}; check `ray list actors` and the "
                                "shard's log", retry_after_s=max(1.0, self.retry_timeout_s))


# calls that may legitimately take long (a base load / whole-log replay): no per-call timeout
_LONG_CALLS = frozenset({"prepare_base", "commit_base", "set_base", "snapshot"})


@contextlib.contextmanager
def cyclic_gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off while a shard builds its users (snapshot, base, log replay),
    back on after (when it was on). The load makes millions of new containers, none of them garbage, and
    every collection it triggers walks all of them: 60,000 users recovered in 10.8-13.5 s with it on and
    4.4-4.7 s off (same snapshot and log tail, this 2-core machine). Reference counting frees as usual;
    the setting is process-wide while it lasts."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


def _snapshot_dict(st: UserState) -> dict[str, Any]:
    d = state_to_dict(st)
    d.pop("vector", None)  # recomputed on the next get (the vectorizer may have changed meanwhile)
    return d


def _has_ts(e: Mapping[str, Any] | Event) -> bool:
    return isinstance(e, Event) or (isinstance(e, Mapping) and e.get("ts") is not None)


def _total(shards: list[dict[str, Any]]) -> dict[str, Any]:
    return {"n_shards": len(shards), "n_users": sum(s["n_users"] for s in shards),
            "n_events": sum(s["n_events"] for s in shards),
            "n_base_users": sum(s["n_base_users"] for s in shards),
            "n_materialised": sum(s["n_materialised"] for s in shards), "shards": shards}


def _check_redis_meta(url: str, n_shards: int) -> None:
    """The Redis twin of `_check_log_meta`: PREFIX:meta records n_shards; another n_shards is refused."""
    from llmrec.state.backends import RedisBackend

    b = RedisBackend(url, 0)
    key = f"{b.prefix}:meta"
    b._call("meta", b.r.set, key, json.dumps({"stage": "events", "n_shards": n_shards}), nx=True)
    meta = json.loads(b._call("meta", b.r.get, key))
    b.close()
    if meta.get("n_shards") != n_shards:
        raise ValueError(f"redis {b.describe()} was written by a state store with "
                         f"n_shards={meta.get('n_shards')}, "
                         f"got n_shards={n_shards}; use the same n_shards or another prefix")


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
