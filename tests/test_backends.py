"""The same shard behaviour on both durable backends: files in the log folder and Redis Streams.

Each test runs twice (`backend` = "file" | "redis"); the Redis one gets its own redis-server (AOF,
`appendfsync always`) per test. `Storage` breaks and heals each backend the way it really fails: a full disk
(fsync fails with ENOSPC) for files, a Redis server that is down (killed) for Redis.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest
from test_store import comparable, make_events, reference_states, vec_factory

from llmrec.state.errors import StateUnavailable
from llmrec.state.store import UserStateShard


class Storage:
    def __init__(self, kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
        self.kind, self.dir = kind, tmp_path / "events"
        self.redis = request.getfixturevalue("redis_server") if kind == "redis" else None
        self._mp = request.getfixturevalue("monkeypatch")
        self._real_fsync = os.fsync

    def shard(self, **kw) -> UserStateShard:
        kw.setdefault("background", False)
        url = self.redis.url if self.redis else None
        return UserStateShard(0, str(self.dir), vec_factory(), state_url=url, **kw)

    def records(self, shard: UserStateShard) -> list[dict]:
        return list(shard.log.records())

    def break_it(self) -> None:
        if self.redis is not None:
            self.redis.stop(hard=True)
            return

        def full_disk(fd: int) -> None:
            if os.readlink(f"/proc/self/fd/{fd}").endswith(".jsonl"):
                raise OSError(errno.ENOSPC, "No space left on device")
            self._real_fsync(fd)

        self._mp.setattr(os, "fsync", full_disk)

    def heal(self) -> None:
        if self.redis is not None:
            self.redis.start()
        else:
            self._mp.setattr(os, "fsync", self._real_fsync)


@pytest.fixture(params=["file", "redis"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    return Storage(request.param, tmp_path, request)


def test_restart_rebuilds_exactly_and_recognises_retries(storage: Storage) -> None:
    users = ["a", "b", "c"]
    events = make_events(30, users)
    shard = storage.shard(snapshot_every=7)
    for k in range(0, 30, 4):
        shard.apply(events[k: k + 4])
    want = {u: comparable(s) for u, s in reference_states(events).items()}
    assert {u: comparable(s) for u, s in shard.users.items()} == want
    shard.close()
    again = storage.shard()
    assert {u: comparable(s) for u, s in again.users.items()} == want
    assert 0 < again.replayed < 30  # snapshot + the log's tail
    assert all(r["duplicate"] for r in again.apply(events[-4:]))
    assert [r["seq"] for r in storage.records(again)] == list(range(1, 31))
    again.close()


def test_storage_down_is_503_then_nothing_acknowledged_is_lost(storage: Storage) -> None:
    events = make_events(12, ["a", "b"])
    shard = storage.shard(snapshot_every=5)
    shard.apply(events[:4])
    storage.break_it()
    for k in (4, 6):
        with pytest.raises(StateUnavailable) as exc:
            shard.apply(events[k: k + 2])
        assert not isinstance(exc.value, ValueError)  # never a 4xx
    assert shard.stats()["n_events"] == 4
    storage.heal()
    for k in range(4, 12, 2):  # the client retries the refused batches, then goes on
        shard.apply(events[k: k + 2])
    want = {u: comparable(s) for u, s in reference_states(events).items()}
    assert {u: comparable(s) for u, s in shard.users.items()} == want
    shard.close()
    again = storage.shard()
    assert {u: comparable(s) for u, s in again.users.items()} == want
    assert [r["seq"] for r in storage.records(again)] == list(range(1, 13))  # no gap, no duplicate
    again.close()


def test_delete_is_durable_and_purged_on_both(storage: Storage) -> None:
    shard = storage.shard()
    e = {"event_id": "x1", "user_id": "gone", "item_id": "i1", "event": "like", "ts": time.time() - 5}
    shard.apply([e, {"event_id": "y", "user_id": "stay", "item_id": "i2", "event": "like", "ts": 1.0}])
    shard.snapshot()
    assert shard.delete("gone") is True
    assert shard.apply([e])[0]["deleted"] is True  # a retry of an event sent before the delete
    shard.close()
    again = storage.shard()
    assert again.get("gone") is None and again.get("stay").n_events == 1
    assert {r["user_id"] for r in storage.records(again)} == {"stay"}
    assert again.tombstones.seq("gone") >= 0
    again.close()


def test_background_snapshots_and_batched_purges(storage: Storage) -> None:
    shard = storage.shard(background=True, snapshot_every=10, purge_interval_s=30)
    users = [f"w{k}" for k in range(12)]
    shard.apply(make_events(40, users))
    deadline = time.monotonic() + 20
    while shard.stats()["snapshots_written"]["full"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    for u in users[:5]:
        shard.delete(u)
    assert shard.stats()["pending_purges"] == 5
    shard._wake.set()
    while shard.stats()["pending_purges"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert shard.stats()["purged_users"] == 5
    assert not {r["user_id"] for r in storage.records(shard)} & set(users[:5])
    pw = shard.stats()["purge_worker"]  # the purge ran in the child process, not in the shard's GIL
    assert pw["jobs"] >= 1 and pw["in_process"] == 0 and pw["pid"] not in (None, os.getpid())
    want = {u: comparable(s) for u, s in shard.users.items()}
    shard.close()
    again = storage.shard()
    assert {u: comparable(s) for u, s in again.users.items()} == want and again.replayed == 0
    again.close()


def test_snapshot_users_are_parsed_on_first_read_after_a_restart(storage: Storage) -> None:
    """Both backends store a user's event count beside its state text, so a restart counts without parsing
    and parses each user when first read; the states equal the brute-force fold; a delta (files) or an
    in-place update (Redis) of one user replaces its full-snapshot state."""
    users = [f"u{k}" for k in range(40)]
    events = make_events(200, users)
    shard = storage.shard(snapshot_every=20)
    shard.apply(events[:180])  # a full snapshot
    shard.apply(events[180:])  # u20..u39 change: a delta (files) / in-place update (Redis) of those users
    assert shard.stats()["snapshots_written"] == {"full": 1, "delta": 1}
    shard.close()
    again = storage.shard()
    assert again.replayed == 0 and again.users.n_parsed == 0 and len(again.users) == 40
    assert again.stats()["n_events"] == 200
    want = {u: comparable(s) for u, s in reference_states(events).items()}
    assert comparable(again.users["u39"]) == want["u39"] and again.users.n_parsed == 1
    assert {u: comparable(s) for u, s in again.users.items()} == want and again.users.n_parsed == 40
    again.close()


def test_acknowledged_events_survive_a_hard_storage_restart(storage: Storage) -> None:
    """Redis killed with SIGKILL and restarted (AOF, appendfsync always): every acknowledged event is there.
    (For files the same holds by fsync; the restart is the shard's own.)"""
    shard = storage.shard()
    events = make_events(20, ["a", "b", "c"])
    for k in range(0, 20, 5):
        shard.apply(events[k: k + 5])
    shard.close()
    if storage.redis is not None:
        storage.redis.stop(hard=True)
        storage.redis.start()
    again = storage.shard()
    want = {u: comparable(s) for u, s in reference_states(events).items()}
    assert {u: comparable(s) for u, s in again.users.items()} == want
    again.close()


def test_a_purge_while_redis_is_down_is_unavailable_and_done_once_it_is_back(redis_server, tmp_path: Path
                                                                              ) -> None:
    """The purge worker's Redis errors come back as the shard's own (StateUnavailable: the pass is retried),
    and a worker whose connection broke serves the next pass."""
    shard = UserStateShard(0, str(tmp_path / "events"), vec_factory(), state_url=redis_server.url,
                           background=True, purge_interval_s=600)  # the purge waits for snapshot()
    shard.apply([{"event_id": f"e{k}", "user_id": u, "item_id": f"i{k}", "event": "like", "ts": 1.0 + k}
                 for k, u in enumerate(["gone", "stay", "gone", "stay"])])
    shard.snapshot()
    assert shard.delete("gone") is True  # tombstone written; the log purge waits for the next pass
    redis_server.stop(hard=True)
    with pytest.raises(StateUnavailable, match="purge worker"):
        shard.snapshot()
    redis_server.start()
    shard.snapshot()
    assert [r["user_id"] for r in shard.log.records()] == ["stay", "stay"]
    pw = shard.stats()["purge_worker"]
    assert (pw["jobs"], pw["in_process"], pw["starts"]) == (2, 0, 1)
    shard.close()
