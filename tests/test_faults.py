"""The fault suite (`make test-faults`, also in `make test-slow`): real faults, then the invariant that every
acknowledged event is counted exactly once and nothing refused is applied.

- a full disk: a 256 KiB tmpfs under the event log (needs root, as the project's machines and CI run);
- kill -9 of a state shard process mid-stream, on both backends (files, Redis);
- a corrupt record in the middle of a segment: recovery stops loudly, naming the file;
- Redis killed (SIGKILL) while events stream in, then restarted (AOF, appendfsync always).
The Serve-level faults (replica kill, the 10,000-request fuzzer) are in test_faults_serve.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
from test_store import comparable, make_events, reference_states, vec_factory

from llmrec.state.errors import LogCorruption, StateUnavailable
from llmrec.state.store import StateStore, UserStateShard

pytestmark = [pytest.mark.faults, pytest.mark.timeout(900)]


def stream(apply, events: list[dict], batch: int, deadline_s: float, refused: list, acked: list) -> None:
    """A client that sends `batch` events per call and retries a refused call (same ids) until acked."""
    deadline = time.monotonic() + deadline_s
    for k in range(0, len(events), batch):
        chunk = events[k: k + batch]
        while True:
            try:
                acked.extend(apply(chunk))
                break
            except StateUnavailable as e:  # 503: nothing of the batch was applied; retry the same ids
                refused.append(str(e))
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def check_exactly_once(users: dict, log_ids: list[str], events: list[dict], acked: list[dict]) -> None:
    want = {u: comparable(s) for u, s in reference_states(events).items()}
    assert {u: comparable(s) for u, s in users.items()} == want
    assert sorted(log_ids) == sorted(e["event_id"] for e in events)  # each once: no refused batch stayed
    assert sorted(a["event_id"] for a in acked) == sorted(e["event_id"] for e in events)


def test_full_disk_on_a_real_tmpfs(tmp_path: Path) -> None:
    mnt = tmp_path / "events"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], check=True)
    try:
        (mnt / "ballast").write_bytes(b"\0" * (190 << 10))  # leaves ~60 KiB: the log fills it soon
        events = make_events(400, [f"d{k}" for k in range(8)], seed=11)
        shard = UserStateShard(0, str(mnt), vec_factory(), snapshot_every=60, background=False)
        acked: list[dict] = []
        refused: list[str] = []
        healed = threading.Timer(3.0, lambda: (mnt / "ballast").unlink())  # an operator frees space
        healed.start()
        stream(shard.apply, events, batch=5, deadline_s=120, refused=refused, acked=acked)
        healed.join()
        assert refused, "the disk never filled up: make the ballast larger"
        assert any("No space left" in r for r in refused)
        assert shard.stats()["snapshot_failures"] >= 1  # snapshots failed too, and never failed a write
        users = {u: s for u, s in shard.users.items()}
        shard.close()
        again = UserStateShard(0, str(mnt), vec_factory(), background=False)
        check_exactly_once(again.users, [r["event_id"] for r in again.log.records()], events, acked)
        assert {u: comparable(s) for u, s in users.items()} == {
            u: comparable(s) for u, s in again.users.items()}
        again.close()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("backend", ["file", "redis"])
def test_kill_9_of_a_shard_mid_stream(ray_local, tmp_path: Path, backend: str,
                                      request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue("redis_server").url if backend == "redis" else None
    store = StateStore(n_shards=2, log_dir=str(tmp_path / "events"), namespace="llmrec-test",
                       name=f"f-{uuid.uuid4().hex[:8]}", vectorizer_factory=vec_factory(), snapshot_every=40,
                       retry_timeout_s=60, state_url=url)
    try:
        users = [f"k{k}" for k in range(10)]
        events = make_events(400, users, seed=13)
        acked: list[dict] = []
        refused: list[str] = []
        t = threading.Thread(target=stream, args=(store.apply_sync, events, 4, 240, refused, acked))
        t.start()
        while len(acked) < 120 and t.is_alive():
            time.sleep(0.01)
        victim = store.shard_of(users[0])
        pid = store.stats_sync()["shards"][victim]["pid"]
        os.kill(pid, signal.SIGKILL)  # kill -9, in the middle of a batch or between two
        t.join(timeout=300)
        assert not t.is_alive() and len(acked) == 400
        st = store.stats_sync()
        assert st["shards"][victim]["pid"] != pid and st["n_events"] == 400
        got = {u: store.get_sync(u) for u in users}
        ref = reference_states(events)
        for u in users:
            assert got[u].n_events == ref[u].n_events
            assert [h.item_id for h in got[u].history] == [h[0] for h in ref[u].history]
        assert all(r["duplicate"] for r in store.apply_sync(events[:40]))  # resending changes nothing
    finally:
        store.shutdown(kill_all=True)


def test_corrupt_mid_segment_record_stops_recovery_loudly(tmp_path: Path) -> None:
    shard = UserStateShard(0, str(tmp_path), vec_factory(), background=False)
    shard.apply(make_events(30, ["a", "b"]))
    shard.close()
    seg = next(tmp_path.glob("s000-*.jsonl"))
    data = seg.read_bytes()
    mid = data.index(b'"user_id"', len(data) // 2)
    seg.write_bytes(data[:mid] + b'"user_iD"' + data[mid + 9:])  # one flipped bit in the middle
    with pytest.raises(LogCorruption, match=rf"{seg.name}, line \d+ .*recovery stopped"):
        UserStateShard(0, str(tmp_path), vec_factory(), background=False)
    seg.write_bytes(data)
    again = UserStateShard(0, str(tmp_path), vec_factory(), background=False)
    assert sum(s.n_events for s in again.users.values()) == 30
    again.close()


def test_redis_killed_and_restarted_while_events_stream(redis_server, tmp_path: Path) -> None:
    shard = UserStateShard(0, str(tmp_path / "events"), vec_factory(), snapshot_every=50, background=False,
                           state_url=redis_server.url)
    events = make_events(300, [f"r{k}" for k in range(6)], seed=17)
    acked: list[dict] = []
    refused: list[str] = []
    t = threading.Thread(target=stream, args=(shard.apply, events, 3, 120, refused, acked))
    t.start()
    while len(acked) < 90 and t.is_alive():
        time.sleep(0.005)
    redis_server.stop(hard=True)  # SIGKILL: only what AOF fsync'd survives
    time.sleep(1.0)
    redis_server.start()
    t.join(timeout=180)
    assert not t.is_alive() and refused, "the stream never hit the outage"
    shard.close()
    again = UserStateShard(0, str(tmp_path / "events"), vec_factory(), background=False,
                           state_url=redis_server.url)
    check_exactly_once(again.users, [r["event_id"] for r in again.log.records()], events, acked)
    again.close()
