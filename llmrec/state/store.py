"""Sharded per-user state on Ray: `UserStateShard` actors (log first, then memory), `StateStore` client.

Each shard owns the users with `shard_of(user_id, n_shards) == shard_id` (zlib.crc32, stable across
processes, unlike Python's salted `hash()`), one `EventLog` shard in `log_dir` and a snapshot file
`snapshot-sNNN.json` there. `apply` validates the whole batch, drops duplicates (event ids already applied
to that user, or repeated in the batch), appends the rest to the log with fsync, and only then updates memory
and replies: an acknowledged event is on disk, and a retry of an event whose reply was lost is recognised
(its id is in `UserState.applied_ids`, rebuilt by the log replay), so every event counts exactly once.

On (re)start a shard loads its snapshot and replays the log records after the snapshot's seq. Vectors are
not trusted from the snapshot (the vectorizer may have changed): they are recomputed lazily on `get`.

`StateStore` creates (or joins) named detached actors `{name}-{i}` in `namespace` with `max_restarts=-1`
and `num_cpus=0`, routes calls by `shard_of`, and when an actor dies mid-call (`RayActorError`, which covers
`ActorDiedError` and `ActorUnavailableError`) waits up to `retry_timeout_s` for Ray to restart it and sends
the same call once more (the client assigns event ids BEFORE the first send, so the retry is idempotent).

Choices the design leaves open:
- `log_dir/meta.json` (stage "events") records `n_shards`; a store with another `n_shards` on the same
  folder is refused (users would map to other shards than their logged events).
- Joining existing actors whose `log_dir` differs from ours is refused (pass the same folder or another name).
- `delete` removes the user from memory, writes a snapshot, then rewrites the log segments without the user.
- `get` returns the summary (`user_state.summary`) plus `vector` (list[float] or None) and `shard`.
- The vectorizer factory should be small (a path, not arrays): Ray stores constructor arguments over ~100 KB
  in the object store, where a detached actor's restart can no longer find them once the creating driver is
  gone (ray-project/ray#53727). `EmbeddingsMeanVectorizer(embeddings_dir)` is the small production factory.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmrec.schema import META_FILE
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


def shard_of(user_id: str, n_shards: int) -> int:
    """Stable shard of a user: zlib.crc32(utf-8 bytes) % n_shards (same in every process and run)."""
    return zlib.crc32(user_id.encode("utf-8")) % n_shards


class UserStateShard:
    """State of the users of one shard (use as a Ray actor via `StateStore`; also works as a plain object).

    Args:
        shard_id: this shard's id (names its log segments and snapshot).
        log_dir: the shared event-log folder.
        vectorizer_factory: picklable zero-arg callable returning a vectorizer `(UserState) -> (D,) | None`;
            called here, inside the actor, so a model loads in the actor. None = no vectors.
        snapshot_every: write a snapshot after this many new events.
        history_len: bound of each user's history.
        n_shards: when given, events of users that belong to another shard are refused.
    """

    def __init__(self, shard_id: int, log_dir: str, vectorizer_factory: Callable[[], Any] | None = None,
                 snapshot_every: int = 1000, history_len: int = 200, *, n_shards: int | None = None) -> None:
        t0 = time.perf_counter()
        if snapshot_every < 1:
            raise ValueError(f"snapshot_every must be >= 1, got {snapshot_every}")
        self.shard_id = int(shard_id)
        self.log_dir = str(log_dir)
        self.n_shards = n_shards
        self.snapshot_every = int(snapshot_every)
        self.history_len = int(history_len)
        self.users: dict[str, UserState] = {}
        snap_seq = self._load_snapshot()
        self.log = EventLog(self.log_dir, shard=self.shard_id, min_next_seq=snap_seq + 1)
        self.replayed, bad, dups = 0, 0, 0
        counters: dict[str, int] = {}
        for rec in iter_events(self.log_dir, shard=self.shard_id, after_seq=snap_seq, counters=counters):
            fields = {k: v for k, v in rec.items() if k not in ("seq", "shard")}
            try:
                ev = Event.from_dict(fields)
            except ValueError as e:
                bad += 1
                logger.error("shard %d: log record seq %s is invalid, skipped: %s", self.shard_id,
                             rec["seq"], e)
                continue
            st = self.users.get(ev.user_id)
            if st is not None and st.has_applied(ev.event_id):
                dups += 1
                continue
            self.users[ev.user_id] = apply_event(st or self._new_state(ev.user_id), ev)
            self.replayed += 1
        self._since_snapshot = self.replayed
        self._n_events = sum(s.n_events for s in self.users.values())  # kept current: stats() is O(1)
        self.vectorizer = vectorizer_factory() if vectorizer_factory is not None else None
        self._dirty: set[str] = set(self.users)
        logger.info("shard %d ready: %d users, snapshot seq %d + %d replayed events (%d duplicate, "
                    "%d invalid, %d torn skipped) in %.2fs", self.shard_id, len(self.users), snap_seq,
                    self.replayed, dups, bad, counters.get("torn", 0), time.perf_counter() - t0)

    def apply(self, events: Sequence[Mapping[str, Any] | Event]) -> list[dict[str, Any]]:
        """Validate all, de-duplicate, log with fsync, then update memory and vectors.

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
            st = self.users.get(ev.user_id)
            dup = ev.event_id in batch_ids or (st is not None and st.has_applied(ev.event_id))
            batch_ids.add(ev.event_id)
            dup_flags.append(dup)
            if not dup:
                new.append(ev)
        self.log.append(new)  # durable before memory changes and before we reply
        versions: dict[str, int] = {}
        for ev in new:
            st = apply_event(self.users.get(ev.user_id) or self._new_state(ev.user_id), ev)
            self.users[ev.user_id] = st
            versions[ev.event_id] = st.version
        for uid in {ev.user_id for ev in new}:
            self._refresh_vector(uid)
        self._since_snapshot += len(new)
        self._n_events += len(new)
        if self._since_snapshot >= self.snapshot_every:
            self.snapshot()
        return [
            {"user_id": ev.user_id, "event_id": ev.event_id, "duplicate": dup,
             "state_version": self.users[ev.user_id].version if dup else versions[ev.event_id]}
            for ev, dup in zip(evs, dup_flags)
        ]

    def get(self, user_id: str) -> dict[str, Any] | None:
        """Summary + `vector` (list[float] (D,) or None) + `shard`; None for an unknown user."""
        st = self.users.get(user_id)
        if st is None:
            return None
        if user_id in self._dirty:
            self._refresh_vector(user_id)
            st = self.users[user_id]
        return {**summary(st), "vector": st.vector, "shard": self.shard_id}

    def delete(self, user_id: str) -> bool:
        """Forget a user: memory, a fresh snapshot, then the logged events. True if anything was removed."""
        gone = self.users.pop(user_id, None)
        existed = gone is not None
        self._n_events -= gone.n_events if gone is not None else 0
        self._dirty.discard(user_id)
        self.snapshot()
        removed = self.log.forget_user(user_id)
        logger.info("shard %d: deleted user %r (in memory: %s, %d logged events)", self.shard_id, user_id,
                    existed, removed)
        return existed or removed > 0

    def stats(self) -> dict[str, Any]:
        return {
            "shard_id": self.shard_id, "n_users": len(self.users),
            "n_events": self._n_events, "last_seq": self.log.last_seq,
            "log_dir": self.log_dir, "replayed_at_start": self.replayed,
            "since_snapshot": self._since_snapshot, "pid": os.getpid(),
        }

    def snapshot(self) -> dict[str, Any]:
        """Write every user's state atomically to `snapshot-sNNN.json` (with the log's last seq)."""
        t0 = time.perf_counter()
        path = Path(self.log_dir) / _SNAPSHOT.format(self.shard_id)
        body = {"shard": self.shard_id, "last_seq": self.log.last_seq, "created_at": time.time(),
                "users": {uid: state_to_dict(st) for uid, st in self.users.items()}}
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(body, f, separators=(",", ":"), allow_nan=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(self.log_dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
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

    def _new_state(self, user_id: str) -> UserState:
        return UserState(user_id=user_id, history_len=self.history_len)

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

    def _load_snapshot(self) -> int:
        path = Path(self.log_dir) / _SNAPSHOT.format(self.shard_id)
        if not path.is_file():
            return 0
        t0 = time.perf_counter()
        body = json.loads(path.read_text(encoding="utf-8"))
        if body.get("shard") != self.shard_id:
            raise ValueError(f"{path} is the snapshot of shard {body.get('shard')}, expected {self.shard_id}")
        self.users = {uid: state_from_dict(d) for uid, d in body["users"].items()}
        logger.info("shard %d: loaded snapshot %s (%d users, seq %d) in %.2fs", self.shard_id, path,
                    len(self.users), body["last_seq"], time.perf_counter() - t0)
        return int(body["last_seq"])


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
                 snapshot_every: int = 1000, history_len: int = 200, retry_timeout_s: float = 60.0) -> None:
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
            ).remote(i, self.log_dir, vectorizer_factory, snapshot_every, history_len, n_shards=n_shards)
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
        logger.info("state store %r: %d shards ready (%d created, %d joined) on %s in %.2fs", name, n_shards,
                    len(self._created), n_shards - len(self._created), self.log_dir, time.perf_counter() - t0)

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
            "n_events": sum(s["n_events"] for s in shards), "shards": shards}


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
