"""Where a state shard keeps its durable data: the event log, snapshots, tombstones and the hash key.

Two backends with one interface (`ShardBackend`); `UserStateShard` only talks to it:

- `FileBackend` (the embedded default): the log folder (`llmrec.state.event_log` segments, snapshot files,
  `tombstones-sNNN.jsonl`, `hash-key`). A restarted shard finds its data only on the same disk, so on a
  cluster the folder must be on storage every node mounts.
- `RedisBackend` (`redis://[:password@]host:port/db?prefix=NAME`): Redis Streams for the log, hashes for the
  snapshot and a list for the tombstones, on a Redis server every node reaches, so a shard restarted on
  another node finds everything. Durability is Redis's: run it with AOF on. `appendfsync always` fsyncs
  before Redis answers, so an acknowledged event survives a crash of the Redis machine (each batch costs an
  fsync on the Redis host, like the file backend); `appendfsync everysec` (Redis's default with AOF) is
  faster but a crash of the Redis machine can lose the last second of acknowledged events. The fault suite
  runs with `always`.

Redis keys (PREFIX defaults to "llmrec"): `PREFIX:hash-key`, `PREFIX:meta` (n_shards), per shard
`PREFIX:sNNN:log` (stream; entry id `<seq>-0`, fields r = the JSON record, w = write time),
`PREFIX:sNNN:users` (hash user -> {"q": seq written at, "n": n_events, "s": state}; read lazily like the
files, `llmrec.state.snapshots.StoredState`), `PREFIX:sNNN:snap` (snapshot header
JSON), `PREFIX:sNNN:tomb`
(list of tombstone lines), `PREFIX:sNNN:lock` (the live writer's name).
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit, urlunsplit

from llmrec.artifacts import fsync_dir
from llmrec.state.errors import LogWriteError, StateUnavailable
from llmrec.state.event_log import EventLog, encode_record, iter_events
from llmrec.state.privacy import load_or_create_key
from llmrec.state.purge_worker import PurgeWorker
from llmrec.state.snapshots import (
    SnapshotState,
    delta_path,
    delta_paths,
    full_path,
    read_snapshots,
    split_tagged,
    state_text,
    write_snapshot,
)
from llmrec.state.user_state import Event

logger = logging.getLogger(__name__)

__all__ = ["ShardBackend", "FileBackend", "RedisBackend", "open_backend", "HASH_KEY_FILE"]

HASH_KEY_FILE = "hash-key"

# a user's value in the Redis users hash (format 3); group 1 is the seq it was written at
_USER_VALUE = re.compile(r'\{"q":(\d+),"n":(\d+),"s":(\{.*\})\}\s*\Z', re.S)


class ShardBackend(Protocol):
    """One shard's durable storage (see the module docstring)."""

    last_seq: int

    def hash_key(self) -> bytes: ...
    def read_snapshots(self) -> tuple[dict[str, Any] | None, list[tuple[int, dict[str, SnapshotState]]]]: ...
    def tomb_lines(self) -> list[str]: ...
    def tomb_append(self, line: str, fsync: bool) -> None: ...
    def open_log(self, min_next_seq: int) -> None: ...
    def append(self, events: Sequence[Event | Mapping[str, Any]]) -> None: ...
    def records(self, after_seq: int | None = None, counters: dict[str, int] | None = None
                ) -> Iterator[dict[str, Any]]: ...
    def forget_users(self, users: Mapping[str, int | None]) -> int: ...
    def purge_stats(self) -> dict[str, Any] | None: ...
    def retire(self, upto_seq: int, older_than_s: float) -> int: ...
    def write_snapshot(self, full: bool, header: Mapping[str, Any], users: Iterable[tuple[str, SnapshotState]]
                       ) -> int: ...
    def snapshot_info(self) -> tuple[bool, int]: ...
    def close(self) -> None: ...


def open_backend(log_dir: str, shard: int, url: str | None = None, *, hash_key_file: str | None = None,
                 owner: str | None = None) -> FileBackend | RedisBackend:
    """`RedisBackend(url)` for a redis:// or rediss:// URL, else `FileBackend(log_dir)`."""
    if url:
        return RedisBackend(url, shard, owner=owner)
    return FileBackend(log_dir, shard, hash_key_file=hash_key_file)


# --------------------------------------------------------------------------------------------- files


class FileBackend:
    """The log folder on a local (or shared) disk: segments, snapshot files, tombstone file, hash-key."""

    def __init__(self, log_dir: str | os.PathLike, shard: int, *, hash_key_file: str | None = None) -> None:
        self.dir = Path(log_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.shard = shard
        self._key_file = Path(hash_key_file) if hash_key_file else self.dir / HASH_KEY_FILE
        self._log: EventLog | None = None
        self._tomb = self.dir / f"tombstones-s{shard:03d}.jsonl"

    def describe(self) -> str:
        return str(self.dir)

    def hash_key(self) -> bytes:
        return load_or_create_key(self._key_file)

    def read_snapshots(self) -> tuple[dict[str, Any] | None, list[tuple[int, dict[str, SnapshotState]]]]:
        return read_snapshots(self.dir, self.shard)

    def snapshot_info(self) -> tuple[bool, int]:
        """(a full snapshot exists, deltas newer than it)."""
        full = full_path(self.dir, self.shard)
        base = -1
        if full.is_file():
            with open(full, encoding="utf-8") as f:
                base = int(json.loads(f.readline())["last_seq"])
        return full.is_file(), sum(1 for sq, _p in delta_paths(self.dir, self.shard) if sq > base)

    def tomb_lines(self) -> list[str]:
        if not self._tomb.is_file():
            return []
        with open(self._tomb, encoding="utf-8") as f:
            return f.readlines()

    def tomb_append(self, line: str, fsync: bool) -> None:
        new_file = not self._tomb.exists()
        fd = os.open(self._tomb, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            data = line.encode()
            while data:
                data = data[os.write(fd, data):]
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        if new_file and fsync:
            fsync_dir(self.dir)

    def open_log(self, min_next_seq: int) -> None:
        self._log = EventLog(self.dir, shard=self.shard, min_next_seq=min_next_seq)

    @property
    def last_seq(self) -> int:
        return self._log.last_seq  # type: ignore[union-attr]

    @property
    def segment_max_events(self) -> int:
        return self._log.segment_max_events  # type: ignore[union-attr]

    @segment_max_events.setter
    def segment_max_events(self, n: int) -> None:
        self._log.segment_max_events = n  # type: ignore[union-attr]

    def append(self, events: Sequence[Event | Mapping[str, Any]]) -> None:
        self._log.append(events)  # type: ignore[union-attr]

    def records(self, after_seq: int | None = None, counters: dict[str, int] | None = None
                ) -> Iterator[dict[str, Any]]:
        return iter_events(self.dir, shard=self.shard, after_seq=after_seq, counters=counters)

    def forget_users(self, users: Mapping[str, int | None]) -> int:
        return self._log.forget_users(users)  # type: ignore[union-attr]

    def purge_stats(self) -> dict[str, Any] | None:
        """The log's purge worker (`llmrec.state.purge_worker`): pid, jobs it ran, jobs run in the shard."""
        return None if self._log is None else self._log.purge_worker_stats()

    def forget_user(self, user_id: str, max_seq: int | None = None) -> int:
        return self._log.forget_user(user_id, max_seq)  # type: ignore[union-attr]

    def retire(self, upto_seq: int, older_than_s: float) -> int:
        return len(self._log.retire(upto_seq, older_than_s))  # type: ignore[union-attr]

    def write_snapshot(self, full: bool, header: Mapping[str, Any],
                       users: Iterable[tuple[str, SnapshotState]]) -> int:
        if full:
            n = write_snapshot(full_path(self.dir, self.shard), header, users)
            for _sq, p in delta_paths(self.dir, self.shard):
                p.unlink(missing_ok=True)  # all older than this full snapshot
            return n
        return write_snapshot(delta_path(self.dir, self.shard, int(header["last_seq"])), header, users)

    def close(self) -> None:
        if self._log is not None:
            self._log.close()


# --------------------------------------------------------------------------------------------- redis


class RedisBackend:
    """Redis Streams log + hash snapshot + list tombstones (see the module docstring).

    Args:
        url: `redis://[:password@]host:port/db[?prefix=NAME]` (`rediss://` for TLS). Keep the password out
            of config files: `build_app`'s `state_url_env` names an environment variable that holds it.
        shard: shard id.
        owner: the writer's name (a shard actor's name): the same name may take over the shard's lock (Ray
            restarted that actor), another one may not.
    """

    def __init__(self, url: str, shard: int, *, owner: str | None = None, timeout_s: float = 5.0) -> None:
        from llmrec.optional import require

        redis = require("redis", "the Redis state backend (--state-backend redis)")

        parts = urlsplit(url)
        q = parse_qs(parts.query)
        self.prefix = (q.pop("prefix", ["llmrec"]) or ["llmrec"])[0]
        clean = urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
        self._url_shown = urlunsplit((parts.scheme, parts.hostname + (f":{parts.port}" if parts.port else ""),
                                      parts.path, "", "")) if parts.hostname else clean
        self.r = redis.Redis.from_url(clean, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self.shard = shard
        self.owner = owner or f"pid:{os.getpid()}@{socket.gethostname()}:{id(self)}"
        self.last_seq = 0
        self.segment_max_events = 0  # no segments here (a stream); kept for interface parity
        k = f"{self.prefix}:s{shard:03d}"
        self._log_key, self._users, self._snap, self._tomb, self._lock = (
            f"{k}:log", f"{k}:users", f"{k}:snap", f"{k}:tomb", f"{k}:lock")
        self._locked = False
        self._uncertain = False
        self._purger = PurgeWorker({"kind": "redis", "url": url})  # started on the first purge

    def describe(self) -> str:
        return f"{self._url_shown} prefix {self.prefix}"

    def _call(self, what: str, fn: Any, *args: Any, **kw: Any) -> Any:
        import redis

        try:
            return fn(*args, **kw)
        except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
            raise StateUnavailable(f"redis {self.describe()}: {what} failed ({type(e).__name__}: {e})",
                                   retry_after_s=2.0) from None

    def hash_key(self) -> bytes:
        key = f"{self.prefix}:hash-key"
        self._call("hash key", self.r.set, key, os.urandom(32), nx=True)
        return self._call("hash key", self.r.get, key)

    def read_snapshots(self) -> tuple[dict[str, Any] | None, list[tuple[int, dict[str, SnapshotState]]]]:
        raw = self._call("snapshot read", self.r.get, self._snap)
        if raw is None:
            return None, []
        header = json.loads(raw)
        by_seq: dict[int, dict[str, SnapshotState]] = {}
        for uid, v in self._call("snapshot read", self.r.hgetall, self._users).items():
            text = v.decode("utf-8", "surrogatepass")
            got = split_tagged(text, _USER_VALUE, self._users)
            if got is None:  # written before "n" (format 2): parse it whole
                d = json.loads(text)
                q, st = str(d["q"]), d["s"]
            else:
                q, st = got
            by_seq.setdefault(int(q), {})[uid.decode("utf-8", "surrogatepass")] = st
        return header, sorted(by_seq.items())

    def snapshot_info(self) -> tuple[bool, int]:
        return bool(self._call("snapshot read", self.r.exists, self._snap)), 0  # deltas are merged in place

    def tomb_lines(self) -> list[str]:
        return [x.decode() for x in self._call("tombstones", self.r.lrange, self._tomb, 0, -1)]

    def tomb_append(self, line: str, fsync: bool) -> None:
        self._call("tombstone write", self.r.rpush, self._tomb, line)

    def open_log(self, min_next_seq: int) -> None:
        self._take_lock()
        last = self._call("log read", self.r.xrevrange, self._log_key, "+", "-", count=1)
        on_server = int(last[0][0].split(b"-")[0]) if last else 0
        self.last_seq = max(on_server, min_next_seq - 1)
        logger.info("redis log %s shard %d opened: last seq %d", self.describe(), self.shard, self.last_seq)

    def append(self, events: Sequence[Event | Mapping[str, Any]]) -> None:
        """All events of the batch in one MULTI/EXEC: Redis applies all or none."""
        import redis

        recs = []
        for i, e in enumerate(events):
            ev = e if isinstance(e, Event) else Event.from_dict(e)
            if not ev.event_id:
                raise ValueError(f"events[{i}] has no event_id; the log needs one per event (the store "
                                 "assigns it)")
            recs.append(ev.to_dict())
        if not recs:
            return
        if self._uncertain:
            self._drop_unacknowledged()
        now = time.time()
        pipe = self.r.pipeline(transaction=True)
        for k, rec in enumerate(recs):
            seq = self.last_seq + 1 + k
            pipe.xadd(self._log_key, {"r": encode_record(seq, 0, rec), "w": repr(now)}, id=f"{seq}-0")
        try:
            pipe.execute()
        except (redis.RedisError, OSError) as e:
            # the MULTI/EXEC may have run with its reply lost: find out before the next append
            self._uncertain = True
            raise LogWriteError(f"redis {self.describe()}: appending {len(recs)} event(s) failed "
                                f"({type(e).__name__}: {e}); nothing was acknowledged",
                                retry_after_s=2.0) from None
        self.last_seq += len(recs)

    def _drop_unacknowledged(self) -> None:
        """After a failed append, entries past the last acknowledged seq are a batch whose reply was lost (it
        was never acknowledged, and the client will resend it): delete them, so it is not counted twice."""
        ids = [eid for eid, _f in self._call("log read", self.r.xrange, self._log_key,
                                             f"{self.last_seq + 1}-0", "+")]
        if ids:
            self._call("log repair", self.r.xdel, self._log_key, *ids)
            # stream ids only grow: the next batch starts after the dropped one (a gap without acked data)
            self.last_seq = max(int(i.split(b"-")[0]) for i in ids)
            logger.warning("redis log %s shard %d: dropped %d entries of a batch whose reply was lost (never "
                           "acknowledged)", self.describe(), self.shard, len(ids))
        self._uncertain = False

    def records(self, after_seq: int | None = None, counters: dict[str, int] | None = None
                ) -> Iterator[dict[str, Any]]:
        n = 0
        for eid, raw in self._entries(after_seq):
            rec = self._parse_entry(eid, raw)
            rec["shard"] = self.shard
            n += 1
            yield rec
        if counters is not None:
            counters["torn"] = counters.get("torn", 0)
            counters["records"] = counters.get("records", 0) + n

    def purge_stats(self) -> dict[str, Any] | None:
        """The purge worker (`llmrec.state.purge_worker`): pid, jobs it ran, jobs run in the shard."""
        return self._purger.stats()

    def forget_users(self, users: Mapping[str, int | None]) -> int:
        """`forget_here` in this shard's purge worker, a child process (the scan of the whole stream leaves
        the shard's GIL to its requests)."""
        return self._purger.forget(self.shard, users)

    def forget_here(self, users: Mapping[str, int | None]) -> int:
        """XDEL the users' entries; an entry is decoded only when its user id token is one of theirs (or
        cannot be read off its bytes), as in the file log's purge."""
        from llmrec.state.event_log import forgets, record_user_token, user_tokens

        tokens = user_tokens(users)
        ids = []
        for eid, raw in self._entries():
            tok = record_user_token(raw)
            if tok is not None and tok not in tokens:
                continue
            r = self._parse_entry(eid, raw)
            if forgets(users, r):
                ids.append(f"{r['seq']}-0")
        for k in range(0, len(ids), 1000):
            self._call("log purge", self.r.xdel, self._log_key, *ids[k: k + 1000])
        return len(ids)

    def _entries(self, after_seq: int | None = None) -> Iterator[tuple[bytes, bytes]]:
        """(stream id, the record's line) of every log entry after `after_seq`, read in pages."""
        start = f"{(after_seq or 0) + 1}-0"
        while True:
            page = self._call("log read", self.r.xrange, self._log_key, start, "+", count=1000)
            for eid, fields in page:
                yield eid, fields[b"r"]
            if len(page) < 1000:
                break
            start = "(" + page[-1][0].decode()

    def _parse_entry(self, eid: bytes, raw: bytes) -> dict[str, Any]:
        from llmrec.state.errors import LogCorruption
        from llmrec.state.event_log import _decode

        _status, rec = _decode(raw)
        if rec is None:  # Redis gives whole entries: a damaged one is corruption, never a torn tail
            raise LogCorruption(f"redis {self.describe()}: log entry {eid.decode()} of shard "
                                f"{self.shard} fails its checksum; recovery stopped")
        rec.pop("bn", None)
        return rec

    def forget_user(self, user_id: str, max_seq: int | None = None) -> int:
        return self.forget_users({user_id: max_seq})

    def retire(self, upto_seq: int, older_than_s: float) -> int:
        horizon = time.time() - older_than_s
        cut = 0
        for eid, fields in self._call("log read", self.r.xrange, self._log_key, "-", "+", count=100_000):
            seq = int(eid.split(b"-")[0])
            if seq > upto_seq or float(fields[b"w"]) >= horizon:
                break
            cut = seq
        if not cut:
            return 0
        return int(self._call("log retire", self.r.xtrim, self._log_key, minid=f"{cut + 1}-0"))

    def write_snapshot(self, full: bool, header: Mapping[str, Any],
                       users: Iterable[tuple[str, SnapshotState]]) -> int:
        """Full: the users hash is rebuilt under a temporary key and renamed into place with the header (one
        MULTI/EXEC); delta: the changed users and the header in one MULTI/EXEC."""
        seq = int(header["last_seq"])
        target = f"{self._users}:tmp" if full else self._users
        n = 0
        pipe = self.r.pipeline(transaction=not full)
        if full:
            pipe.delete(target)
        for uid, st in users:
            text, n_events = state_text(st)
            v = f'{{"q":{seq},"n":{n_events},"s":{text}}}'
            n += len(v)
            pipe.hset(target, uid, v)
            if len(pipe) >= 500 and full:
                self._call("snapshot write", pipe.execute)
                time.sleep(0)  # between chunks, the actor thread may serve a request
        body = json.dumps({"format": 3, **header}, separators=(",", ":"))
        if full:
            self._call("snapshot write", pipe.execute)
            pipe = self.r.pipeline(transaction=True)
            if self._call("snapshot write", self.r.exists, target):
                pipe.rename(target, self._users)
            else:
                pipe.delete(self._users)
        pipe.set(self._snap, body)
        self._call("snapshot write", pipe.execute)
        return n + len(body)

    def close(self) -> None:
        self._purger.close()
        if self._locked:
            try:
                if self.r.get(self._lock) == self.owner.encode():
                    self.r.delete(self._lock)
            except Exception:  # noqa: BLE001 - closing: best effort
                pass
            self._locked = False
        self.r.close()

    def _take_lock(self) -> None:
        ok = self._call("lock", self.r.set, self._lock, self.owner, nx=True)
        if not ok:
            holder = self._call("lock", self.r.get, self._lock)
            if holder != self.owner.encode():
                raise ValueError(f"shard {self.shard} in {self.describe()} is locked by writer "
                                 f"{holder.decode() if holder else '?'}; only one shard actor may write a "
                                 "shard: "
                                 f"stop the other one (or, if it is gone for good, `DEL {self._lock}`)")
        self._locked = True
