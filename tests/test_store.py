"""State store: shard recovery (snapshot + log replay), read-your-writes on Ray, and a crash mid-stream."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import pickle
import threading
import time
import uuid
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_user_state import USERS_BODY

from llmrec.schema import EVENT, ITEM_ID, RATING, TS, USER_ID
from llmrec.state.event_log import iter_events, read_events
from llmrec.state.store import EmbeddingsMeanVectorizer, StateStore, UserStateShard, shard_of
from llmrec.state.user_state import (
    Event,
    HistoryEntry,
    MeanVectorizer,
    StateSummary,
    UserState,
    apply_event,
    state_to_dict,
    summary,
)

RNG = np.random.default_rng(0)
N_ITEMS, DIM = 40, 8
IDS = [f"i{k}" for k in range(N_ITEMS)]
V = RNG.normal(size=(N_ITEMS, DIM)).astype(np.float32)
V /= np.linalg.norm(V, axis=1, keepdims=True)
KINDS = ["view", "click", "like", "dislike", "skip", "purchase", "rating"]


def vec_factory() -> functools.partial:
    return functools.partial(MeanVectorizer, IDS, V)


def make_events(n: int, users: list[str], seed: int = 1) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        kind = KINDS[k % len(KINDS)]
        e = {"event_id": f"ev{seed}-{k}", "user_id": users[k % len(users)],
             "item_id": IDS[rng.integers(N_ITEMS)], "event": kind, "ts": 1_700_000_000.0 + k}
        if kind == "rating":
            e["value"] = float(rng.integers(1, 6))
        out.append(e)
    return out


def reference_states(events: list[dict], history_len: int = 200) -> dict[str, UserState]:
    """Brute force: fold apply_event over the events, each id once."""
    states: dict[str, UserState] = {}
    for d in events:
        e = Event.from_dict(d)
        st = states.get(e.user_id) or UserState(user_id=e.user_id, history_len=history_len)
        if not st.has_applied(e.event_id):
            states[e.user_id] = apply_event(st, e)
    return states


def comparable(st: UserState) -> dict:
    d = state_to_dict(st)
    d.pop("vector")
    return d


def test_shard_of_is_crc32_and_stable() -> None:
    assert shard_of("user-42", 4) == zlib.crc32(b"user-42") % 4 == 3
    assert shard_of("ü", 7) == zlib.crc32("ü".encode()) % 7


def test_shard_rebuilds_from_snapshot_plus_log_and_deletes(tmp_path: Path) -> None:
    users = ["a", "b", "c"]
    events = make_events(25, users)
    shard = UserStateShard(0, str(tmp_path), vec_factory(), snapshot_every=10, background=False)
    for k in range(0, 25, 4):
        res = shard.apply(events[k: k + 4])
        assert not any(r["duplicate"] for r in res)
    assert [r["duplicate"] for r in shard.apply(events[3:5] + [events[3]])] == [True, True, True]
    with pytest.raises(ValueError, match=r"events\[1\]: event.event must be one of"):
        shard.apply([events[0] | {"event_id": "fresh"}, {"user_id": "a", "item_id": "i1", "event": "nope"}])
    assert "fresh" not in shard.users["a"].applied_ids  # validated all first: nothing applied
    ref = reference_states(events)
    got = {u: shard.get(u) for u in users}
    shard.close()
    assert (tmp_path / "snapshot-s000.json").is_file()

    rebuilt = UserStateShard(0, str(tmp_path), vec_factory(), snapshot_every=10, background=False)
    assert rebuilt.replayed == 1  # batches of 4: snapshots after 12 and 24 events, 1 event after the last
    for u in users:
        assert comparable(rebuilt.users[u]) == comparable(ref[u])
        assert rebuilt.get(u) == got[u]
        np.testing.assert_allclose(got[u].vector, MeanVectorizer(IDS, V)(ref[u]), rtol=1e-6)
    # the reply to the last batch was "lost" (the old shard is gone): its retry is recognised after replay
    assert all(r["duplicate"] for r in rebuilt.apply(events[-4:]))
    assert rebuilt.log.last_seq == 25 and rebuilt.users["a"].n_events == ref["a"].n_events
    assert rebuilt.delete("b") is True and rebuilt.get("b") is None
    assert rebuilt.delete("b") is False
    assert rebuilt.stats()["n_events"] == ref["a"].n_events + ref["c"].n_events == 17
    rebuilt.close()
    again = UserStateShard(0, str(tmp_path), vec_factory())
    assert sorted(again.users) == ["a", "c"]
    assert "b" not in {r["user_id"] for r in iter_events(tmp_path)}
    assert "b" not in set(read_events(tmp_path).user_id)
    assert '"b"' not in (tmp_path / "snapshot-s000.json").read_text()
    again.close()


def test_recovery_runs_no_cyclic_gc_and_restores_the_setting(tmp_path: Path, monkeypatch) -> None:
    """A shard rebuilding its users (snapshot + log tail) makes many new containers and no garbage; each
    collection walks them all, which made recovery 2-3x slower at 60k users. The same load runs collections
    with the collector left on (the reference) and none with the pause; the states equal the reference
    fold; the collector is as it was after."""
    import contextlib
    import gc

    import llmrec.state.store as store_mod

    users = [f"u{k}" for k in range(300)]
    events = make_events(3000, users)
    shard = UserStateShard(0, str(tmp_path), vec_factory(), snapshot_every=10**9, background=False)
    shard.apply(events[:2500])
    shard.snapshot()
    shard.apply(events[2500:])  # the log tail after the snapshot
    shard.close()

    real_pause = store_mod.cyclic_gc_paused

    def rebuild(pause: bool = True) -> tuple[UserStateShard, list[int]]:
        """The shard rebuilt from tmp_path; the collections that start inside its bulk load."""
        starts: list[int] = []
        inside = [False]

        def count(phase: str, info: dict) -> None:
            if phase == "start" and inside[0]:
                starts.append(info["generation"])

        @contextlib.contextmanager
        def watched():
            with real_pause() if pause else contextlib.nullcontext():
                inside[0] = True  # from here to the end of the load
                try:
                    yield
                finally:
                    inside[0] = False

        monkeypatch.setattr(store_mod, "cyclic_gc_paused", watched)
        gc.callbacks.append(count)
        try:
            rebuilt = UserStateShard(0, str(tmp_path), vec_factory(), background=False)
        finally:
            gc.callbacks.remove(count)
            monkeypatch.setattr(store_mod, "cyclic_gc_paused", real_pause)
        rebuilt.close()
        return rebuilt, starts

    _, unpaused = rebuild(pause=False)
    assert len(unpaused) >= 5  # the same load with the collector left on: it collects, again and again
    rebuilt, paused = rebuild()
    assert paused == [] and rebuilt.replayed == 500 and gc.isenabled()
    ref = reference_states(events)
    assert {u: comparable(rebuilt.users[u]) for u in users} == {u: comparable(ref[u]) for u in users}
    gc.disable()
    try:
        rebuild()
        assert not gc.isenabled()  # a collector someone turned off stays off
    finally:
        gc.enable()


def _snapshot_lines(path: Path) -> dict[str, str]:
    """user id -> its line in a snapshot file."""
    return {json.loads(line)["u"]: line for line in path.read_text().splitlines()[1:]}


def test_restart_parses_a_snapshot_user_only_when_first_read(tmp_path: Path) -> None:
    """A restart keeps each snapshot user as its text (a line scan instead of one object graph per user) and
    parses it on first use; every state equals the brute-force fold, the counts need no parsing, and a full
    snapshot writes the text of users nobody touched back byte for byte."""
    users = ['\u00fc/"q" \\ x'] + [f"u{k}" for k in range(1, 200)]  # the first: an id that JSON escapes
    events = make_events(600, users)
    shard = UserStateShard(0, str(tmp_path), vec_factory(), snapshot_every=10**9, background=False)
    shard.apply(events[:500])
    shard.snapshot()
    shard.apply(events[500:])  # the log tail: 100 of the 200 users
    before = shard.stats()
    shard.close()
    snap = tmp_path / "snapshot-s000.json"
    lines = _snapshot_lines(snap)
    assert json.loads(snap.read_text().splitlines()[0])["format"] == 3 and len(lines) == 200

    again = UserStateShard(0, str(tmp_path), vec_factory(), background=False)
    in_tail = {e["user_id"] for e in events[500:]}
    assert len(in_tail) == 100 and again.users.n_parsed == 100  # the replay parsed exactly its users
    st = again.stats()
    assert (st["n_users"], st["n_events"], st["n_materialised"]) == (200, before["n_events"], 200) == (
        200, 600, 200)
    ref = reference_states(events)
    quiet = [u for u in users if u not in in_tail]
    assert users[0] == quiet[0]
    for k, u in enumerate(quiet[:4]):
        got = again.get(u)
        assert got.n_events == ref[u].n_events and got.version == ref[u].version
        np.testing.assert_allclose(got.vector, MeanVectorizer(IDS, V)(ref[u]), rtol=1e-6)
        assert comparable(again.users[u]) == comparable(ref[u]) and again.users.n_parsed == 101 + k
    again.snapshot()
    after = _snapshot_lines(snap)
    untouched = quiet[4:]
    assert len(untouched) == 96 and all(after[u] == lines[u] for u in untouched)  # written back as read
    again.close()
    third = UserStateShard(0, str(tmp_path), vec_factory(), background=False)
    assert third.replayed == 0 and third.users.n_parsed == 0
    assert {u: comparable(s) for u, s in third.users.items()} == {u: comparable(ref[u]) for u in users}
    third.close()


def test_a_read_while_the_snapshot_thread_turns_a_user_back_into_text_finds_it(tmp_path: Path) -> None:
    """The snapshot thread swaps a written user's object for its text (`to_text`); a `get` from the actor
    thread in the middle of that swap must wait for it, not answer "unknown user" (or fail)."""
    events = make_events(40, ["u1", "u2"])
    shard = UserStateShard(0, str(tmp_path), vec_factory(), snapshot_every=10**9, background=False)
    shard.apply(events)
    want = comparable(reference_states(events)["u1"])
    paused, go = threading.Event(), threading.Event()

    class PausingDict(dict):  # pauses between taking "u1" out of the objects and storing its text
        def pop(self, key, *default):
            v = super().pop(key, *default)
            if key == "u1" and not go.is_set():
                paused.set()
                go.wait(10)
            return v

    shard.users._live = PausingDict(shard.users._live)
    writer = threading.Thread(target=shard.snapshot)
    writer.start()
    assert paused.wait(10)
    got: dict = {}
    reader = threading.Thread(target=lambda: got.update(s=shard.get("u1")))
    reader.start()
    reader.join(0.5)
    go.set()
    writer.join(10)
    reader.join(10)
    assert got["s"] is not None and got["s"].n_events == want["n_events"] == 20
    assert comparable(shard.users["u1"]) == want
    shard.close()


def test_a_full_snapshot_turns_the_users_it_wrote_back_into_text(tmp_path: Path) -> None:
    """After a full snapshot the users it wrote are kept as its text (memory follows the active users), except
    one whose state changed while the snapshot was written; reads parse them again and equal the brute-force
    fold, vectors included; with the option off every user stays an object."""
    users = [f"u{k}" for k in range(30)]
    events = make_events(300, users)
    shard = UserStateShard(0, str(tmp_path), vec_factory(), snapshot_every=10**9, background=False)
    shard.apply(events)
    for u in users:
        shard.get(u)
    assert shard.users.n_parsed == 30
    job = shard._capture(full=True)  # captured; "u3" changes before the write is done
    late = {"event_id": "late", "user_id": "u3", "item_id": "i5", "event": "like", "ts": 1_800_000_000.0}
    shard.apply([late])
    shard._run_job(job, raise_errors=True)
    assert shard.users.n_parsed == 1 and "u3" in shard.users._live and len(shard.users) == 30
    ref = reference_states(events + [late])
    assert shard.stats()["n_events"] == 301
    for u in users:
        got = shard.get(u)
        assert comparable(shard.users[u]) == comparable(ref[u])
        np.testing.assert_allclose(got.vector, MeanVectorizer(IDS, V)(ref[u]), rtol=1e-6)
    shard.close()
    again = UserStateShard(0, str(tmp_path), vec_factory(), background=False, text_after_snapshot=False)
    for u in users:
        again.get(u)
    again.snapshot()
    assert again.users.n_parsed == 30
    assert {u: comparable(s) for u, s in again.users.items()} == {u: comparable(ref[u]) for u in users}
    again.close()


def test_snapshot_of_the_previous_format_loads_and_a_damaged_state_is_a_server_fault(tmp_path: Path) -> None:
    """A format-2 snapshot (lines without the event count) is parsed at once, as before; a user whose state
    text is damaged fails loudly when first read (SnapshotCorruption, not a client error), naming the file,
    while the shard's other users serve."""
    from llmrec.state.errors import InvalidEvent, SnapshotCorruption

    users = [f"u{k}" for k in range(20)]
    events = make_events(200, users)
    shard = UserStateShard(0, str(tmp_path), vec_factory(), snapshot_every=10**9, background=False)
    shard.apply(events)
    shard.snapshot()
    shard.close()
    snap = tmp_path / "snapshot-s000.json"
    text = snap.read_text()
    head, *rows = text.splitlines()
    old = [json.dumps({"format": 2, **{k: v for k, v in json.loads(head).items() if k != "format"}})]
    old += [json.dumps({"u": r["u"], "s": r["s"]}) for r in map(json.loads, rows)]
    snap.write_text("\n".join(old) + "\n")
    ref = reference_states(events)
    v2 = UserStateShard(0, str(tmp_path), vec_factory(), background=False)
    assert v2.users.n_parsed == 20 and v2.replayed == 0 and v2.stats()["n_events"] == 200
    assert {u: comparable(s) for u, s in v2.users.items()} == {u: comparable(ref[u]) for u in users}
    v2.close()

    line = next(r for r in rows if json.loads(r)["u"] == "u7")
    assert '"history":[[' in line
    snap.write_text(text.replace(line, line.replace('"history":[[', '"history":[[[', 1)))
    broken = UserStateShard(0, str(tmp_path), vec_factory(), background=False)
    with pytest.raises(SnapshotCorruption, match=r"snapshot-s000\.json holds a damaged user state") as e:
        broken.get("u7")
    assert not isinstance(e.value, InvalidEvent | ValueError)
    assert comparable(broken.users["u8"]) == comparable(ref["u8"])
    broken.close()


def test_shard_refuses_wrong_routing_and_text_vec_dim(tmp_path: Path) -> None:
    shard = UserStateShard(0, str(tmp_path), vec_factory(), n_shards=4)
    wrong = next(u for u in (f"u{k}" for k in range(50)) if shard_of(u, 4) != 0)
    with pytest.raises(ValueError, match="belongs to shard"):
        shard.apply([{"user_id": wrong, "item_id": "i1", "event": "like"}])
    right = next(u for u in (f"u{k}" for k in range(50)) if shard_of(u, 4) == 0)
    with pytest.raises(ValueError, match="text_vec has 2 values, the item space has dim 8"):
        shard.apply([{"user_id": right, "event": "like", "text": "t", "text_vec": [1.0, 2.0]}])
    assert shard.log.last_seq == 0
    shard.close()


def test_embeddings_mean_vectorizer_loads_an_embed_artifact(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from llmrec.artifacts import write_meta
    from llmrec.schema import EMBEDDING, EMBEDDINGS_FILE, ITEM_ID

    emb = tmp_path / "embeddings"
    emb.mkdir()
    col = pa.FixedSizeListArray.from_arrays(pa.array(V.reshape(-1), pa.float32()), DIM)
    pq.write_table(pa.table({ITEM_ID: IDS, EMBEDDING: col}), emb / EMBEDDINGS_FILE)
    write_meta(emb, "embed", model_name="hand", dim=DIM, n_items=N_ITEMS, normalized=True)
    factory = EmbeddingsMeanVectorizer(str(emb), half_life=5.0, shared_dir=str(tmp_path / "shared"))
    vec = pickle.loads(pickle.dumps(factory))()  # what the actor receives
    other = factory()  # a second shard on the node maps the same file instead of loading its own copy
    for v in (vec, other):  # no private copy: a view of the mapped file
        assert not v.vectors.flags.owndata and isinstance(v.vectors.base, np.memmap)
    assert vec.vectors.base.filename == other.vectors.base.filename
    assert len(list((tmp_path / "shared").iterdir())) == 2
    s = UserState(user_id="u")
    for k, kind in enumerate(["like", "click", "dislike"]):
        s = apply_event(s, Event(user_id="u", item_id=IDS[k], event=kind, ts=float(k)))
    np.testing.assert_array_equal(vec(s), MeanVectorizer(IDS, V, half_life=5.0)(s))
    with pytest.raises(ValueError, match="run `llmrec embed`"):
        EmbeddingsMeanVectorizer(str(tmp_path / "missing"))()


@pytest.fixture
def store_factory(ray_local, tmp_path: Path):
    made: list[StateStore] = []

    def make(**kw) -> StateStore:
        kw.setdefault("name", f"t-{uuid.uuid4().hex[:8]}")
        kw.setdefault("namespace", "llmrec-test")
        kw.setdefault("log_dir", str(tmp_path / "events"))
        s = StateStore(**kw)
        made.append(s)
        return s

    yield make
    for s in made:  # detached actors outlive the driver: always kill them
        s.shutdown(kill_all=True)


def test_store_read_your_writes_across_shards(store_factory, tmp_path: Path) -> None:
    store = store_factory(n_shards=3, vectorizer_factory=vec_factory())
    users = [f"user{k}" for k in range(12)]
    assert len({store.shard_of(u) for u in users}) == 3
    events = make_events(60, users)
    ref = reference_states(events)
    vectorizer = MeanVectorizer(IDS, V)
    for k in range(0, 60, 12):  # each batch spans all shards; read right after each write
        res = store.apply_sync(events[k: k + 12])
        assert [r["event_id"] for r in res] == [e["event_id"] for e in events[k: k + 12]]
        for e, r in zip(events[k: k + 12], res, strict=True):
            got = store.get_sync(e["user_id"])
            assert got.version == r["state_version"] and got.shard == store.shard_of(e["user_id"])
    for u in users:
        got = store.get_sync(u)
        assert got.n_events == ref[u].n_events == 5
        assert [h.item_id for h in got.history] == [h[0] for h in ref[u].history]
        want = vectorizer(ref[u])
        if want is None:
            assert got.vector is None
        else:
            np.testing.assert_allclose(got.vector, want, rtol=1e-5)

    async def async_flow() -> tuple:
        res = await store.apply([{"user_id": "new", "item_id": "i3", "event": "like"}])
        got, stats = await store.get("new"), await store.stats()
        return res, got, stats, await store.delete("new"), await store.get("new")

    res, got, stats, deleted, gone = asyncio.run(async_flow())
    assert res[0]["duplicate"] is False and len(res[0]["event_id"]) == 32  # id assigned by the client
    np.testing.assert_allclose(got.vector, V[3], rtol=1e-5)
    assert stats["n_users"] == 13 and stats["n_events"] == 61 and stats["n_shards"] == 3
    assert deleted is True and gone is None and store.get_sync("nobody") is None
    with pytest.raises(ValueError, match=r"events\[0\]: event.user_id"):
        store.apply_sync([{"user_id": "", "item_id": "i1", "event": "like"}])

    joined = StateStore(n_shards=3, log_dir=store.log_dir, namespace=store.namespace, name=store.name)
    assert joined._created == [] and joined.get_sync("user0").n_events == 5
    joined.shutdown()  # kills nothing it did not create
    assert store.get_sync("user0").n_events == 5
    with pytest.raises(ValueError, match="n_shards=3, got n_shards=2"):
        StateStore(n_shards=2, log_dir=store.log_dir, namespace=store.namespace, name="other")
    with pytest.raises(ValueError, match="already exists for log_dir"):
        StateStore(n_shards=3, log_dir=str(tmp_path / "elsewhere"), namespace=store.namespace,
                   name=store.name)


def _kill_and_wait(actor, pid: int, timeout_s: float = 60.0) -> None:
    """ray.kill the shard actor (Ray restarts it) and wait until its process `pid` is gone (or a zombie):
    ray.kill is asynchronous, so a call right after it may still reach the old process."""
    import ray

    ray.kill(actor, no_restart=False)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            return
        if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):  # state field, after the command name
            return
        time.sleep(0.05)
    raise AssertionError(f"shard process {pid} still alive {timeout_s:.0f} s after ray.kill")


def test_retry_after_restart_is_recognised_as_duplicate(store_factory) -> None:
    store = store_factory(n_shards=2, retry_timeout_s=60)  # the loaded test machine may restart slowly
    e = {"event_id": "once", "user_id": "alice", "item_id": "i1", "event": "purchase", "ts": 5.0}
    assert store.apply_sync([e])[0]["duplicate"] is False
    s = store.shard_of("alice")
    pid = store.stats_sync()["shards"][s]["pid"]
    _kill_and_wait(store.actors[s], pid)
    res = asyncio.run(store.apply([e]))  # the async path waits for the restart (log replay) and retries
    assert res[0]["duplicate"] is True and res[0]["state_version"] == 1
    st = store.stats_sync()["shards"][s]
    assert st["pid"] != pid and st["replayed_at_start"] == 1
    assert store.get_sync("alice").n_events == 1


def test_fault_kill_shard_mid_stream_every_acked_event_counted_once(store_factory, caplog) -> None:
    """300 events stream from a thread; a shard actor is killed mid-stream; nothing acked lost or doubled."""
    import ray

    store = store_factory(n_shards=2, snapshot_every=40, vectorizer_factory=vec_factory(), retry_timeout_s=60)
    users = [f"fan{k}" for k in range(10)]
    events = make_events(300, users, seed=7)
    acked: list[dict] = []
    failures: list[str] = []
    done = threading.Event()

    def stream() -> None:
        deadline = time.monotonic() + 150
        try:
            for e in events:
                while True:  # a client that retries until acknowledged, always with the same event_id
                    try:
                        acked.append(store.apply_sync([e])[0])
                        break
                    except Exception as err:  # noqa: BLE001 - the store's own retry also failed: try again
                        failures.append(f"{type(err).__name__}: {err}")
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.2)
                time.sleep(0.003)
        finally:
            done.set()

    victim = store.shard_of(users[0])
    pid_before = store.stats_sync()["shards"][victim]["pid"]
    caplog.set_level(logging.WARNING, logger="llmrec.state.store")
    t = threading.Thread(target=stream, daemon=True)
    t.start()
    while len(acked) < 100 and not done.is_set():
        time.sleep(0.01)
    assert not done.is_set(), "stream finished before the kill; slow it down"
    ray.kill(store.actors[victim], no_restart=False)
    n_at_kill = len(acked)
    assert done.wait(timeout=180), "stream did not finish within the bound"
    t.join(timeout=5)
    assert len(acked) == 300 and n_at_kill < 300
    assert [a["event_id"] for a in acked] == [e["event_id"] for e in events]

    stats = store.stats_sync()
    assert stats["shards"][victim]["pid"] != pid_before  # the shard really was restarted
    assert failures or "apply failed" in caplog.text  # and the client really hit the crash
    ref = reference_states(events)
    vectorizer = MeanVectorizer(IDS, V)
    for u in users:
        got = store.get_sync(u)
        # each event was acknowledged exactly once (as new, or as a duplicate when the shard had logged it
        # just before dying and the retry found it), and each is counted exactly once
        n_acked = sum(1 for a in acked if a["user_id"] == u)
        assert got.n_events == n_acked == ref[u].n_events == 30
        assert [h.item_id for h in got.history] == [h[0] for h in ref[u].history]
        want = vectorizer(ref[u])
        assert (got.vector is None) == (want is None)
        if want is not None:
            np.testing.assert_allclose(got.vector, want, rtol=1e-5)
    assert stats["n_events"] == 300
    # the log holds each event once (a duplicate flag marks any retry that reached a restarted shard)
    log_ids = [r["event_id"] for r in iter_events(store.log_dir)]
    assert sorted(log_ids) == sorted(e["event_id"] for e in events)
    # and re-sending everything now changes nothing
    again = store.apply_sync(events[:50])
    assert all(a["duplicate"] for a in again)
    assert store.stats_sync()["n_events"] == 300


def test_a_shard_that_stays_down_is_a_fast_503(store_factory) -> None:
    """It used to make callers wait 60 s and then raised a RuntimeError (an HTTP 500)."""
    import ray

    from llmrec.state.errors import StateUnavailable

    store = store_factory(n_shards=2, shard_memory_mb=300)
    assert [sh["resources"].get("memory") for sh in store.stats_sync()["shards"]] == [300 << 20] * 2
    store.apply_sync([{"user_id": "dora", "item_id": "i1", "event": "like", "ts": 5.0}])
    s = store.shard_of("dora")
    ray.kill(store.actors[s], no_restart=True)  # a node lost for good, a shard that cannot restart
    from ray.exceptions import RayActorError

    with pytest.raises(RayActorError):  # ray.kill is asynchronous: wait until the shard is really gone
        for _ in range(100):
            ray.get(store.actors[s].ping.remote(), timeout=10)
            time.sleep(0.1)
    t0 = time.monotonic()
    with pytest.raises(StateUnavailable) as exc:
        asyncio.run(store.get("dora"))
    assert time.monotonic() - t0 < 15 and exc.value.retry_after_s >= 1
    with pytest.raises(StateUnavailable):
        store.apply_sync([{"user_id": "dora", "item_id": "i2", "event": "like"}])
    other = next(u for u in (f"u{k}" for k in range(50)) if store.shard_of(u) != s)
    assert store.apply_sync([{"user_id": other, "item_id": "i1", "event": "like"}])[0]["duplicate"] is False


# ---- base histories: the users a run already knows -------------------------------------------------------

H = 8  # a short history window, so that many test users overflow it


def make_interactions(n_users: int = 30, n_rows: int = 400, seed: int = 5, user_prefix: str = "p"
                      ) -> pd.DataFrame:
    """Canonical interactions, NOT in time order, with ts ties; a few heavy users overflow the H window."""
    rng = np.random.default_rng(seed)
    users = [f"{user_prefix}{k}" for k in range(n_users)]
    p = np.r_[np.full(4, 8.0), np.ones(n_users - 4)]  # users 0-3 are heavy
    kinds = rng.choice(KINDS, size=n_rows)
    rating = np.where(kinds == "rating", rng.integers(1, 6, size=n_rows).astype(float), np.nan)
    return pd.DataFrame({
        USER_ID: np.array(users)[rng.choice(n_users, size=n_rows, p=p / p.sum())],
        ITEM_ID: np.array(IDS)[rng.integers(N_ITEMS, size=n_rows)],
        TS: rng.integers(1_000, 1_060, size=n_rows).astype(np.int64),  # 60 distinct seconds: many ties
        RATING: rating,
        EVENT: kinds,
    })


def write_run_data(data_dir: Path, df: pd.DataFrame) -> Path:
    from llmrec.artifacts import write_meta
    from llmrec.data.tables import write_interactions

    data_dir.mkdir(parents=True, exist_ok=True)
    write_interactions(df, data_dir)
    write_meta(data_dir, "prepare", fingerprint=f"fp-{len(df)}-{df[TS].sum()}")
    return data_dir


def brute_force(df: pd.DataFrame, user: str, history_len: int = H) -> dict:
    """The expected base state of one user, computed directly with pandas + apply_event."""
    rows = df.reset_index(drop=True)
    rows = rows[rows[USER_ID] == user].assign(_pos=lambda d: d.index).sort_values([TS, "_pos"])
    window = rows.tail(history_len)
    st = UserState(user_id=user, history_len=history_len)
    for r in window.itertuples():
        value = None if np.isnan(r.rating) else float(r.rating)
        st = apply_event(st, Event(user_id=user, item_id=r.item_id, event=r.event, value=value,
                                   ts=float(r.ts)))
    return {"history": [list(h) for h in st.history], "negatives": st.negatives, "n_events": len(rows),
            "seen": sorted(set(rows[ITEM_ID])), "last_ts": float(rows[TS].max())}


def as_expected(got: StateSummary) -> dict:
    return {"history": [list(h) for h in got.history], "negatives": got.negatives, "n_events": got.n_events,
            "seen": list(got.seen), "last_ts": got.last_ts}


def test_crc32_strings_equals_zlib_for_every_shape() -> None:
    import pyarrow as pa

    from llmrec.state.base import crc32_strings

    vals = ["", "a", "user-42", "ü", "日本語のID", "x" * 300, None, "A3JPFWKS83R49V"]
    want = [zlib.crc32((v or "").encode()) for v in vals]
    assert crc32_strings(pa.array(vals)).tolist() == want
    assert crc32_strings(pa.array(vals).slice(2, 4)).tolist() == want[2:6]  # an offset into the buffers
    assert crc32_strings(pa.array(vals, pa.large_string())).tolist() == want


@pytest.mark.parametrize("batch_rows, compact_rows", [(1 << 16, 1 << 22), (37, 50)])
def test_base_load_keeps_exactly_each_shards_users_last_events(tmp_path: Path, batch_rows: int,
                                                                compact_rows: int) -> None:
    """Every shard's arrays == a pandas brute force; small batches + compactions give the same result."""
    from llmrec.state.base import load_base

    df = make_interactions()
    data = write_run_data(tmp_path / "data", df)
    n_shards, loaded = 3, {}
    for s in range(n_shards):
        base = load_base(data, shard_id=s, n_shards=n_shards, history_len=H, batch_rows=batch_rows,
                         compact_rows=compact_rows)
        users = [base.user_id(r) for r in range(base.n_users)]
        assert users == sorted(users, key=lambda u: u.encode()) and all(shard_of(u, 3) == s for u in users)
        for r, u in enumerate(users):
            st = base.state(r, history_len=H)
            got = as_expected(summary(st))
            assert got == brute_force(df, u), u
            assert base.n_total[r] == (df[USER_ID] == u).sum()
        loaded.update({u: s for u in users})
        assert base.rows_read == len(df) and base.skipped == {}
    assert loaded.keys() == set(df[USER_ID])  # every user in exactly one shard
    heavy = brute_force(df, "p0")
    assert heavy["n_events"] > H and len(heavy["seen"]) > len({h[0] for h in heavy["history"]})


def test_base_load_only_keeps_the_users_asked_for(tmp_path: Path) -> None:
    """`only` (a batch job's users) loads exactly those users of the shard, each as the full load has them;
    ids of other shards or of nobody are not loaded."""
    from llmrec.state.base import load_base

    df = make_interactions()
    data = write_run_data(tmp_path / "data", df)
    users = sorted(set(df[USER_ID]))
    for s in range(2):
        mine = [u for u in users if shard_of(u, 2) == s]
        asked = [*mine[::2], "nobody", *[u for u in users if shard_of(u, 2) != s][:2]]
        base = load_base(data, shard_id=s, n_shards=2, history_len=H, batch_rows=37, only=asked)
        got = [base.user_id(r) for r in range(base.n_users)]
        assert got == sorted(mine[::2], key=lambda u: u.encode()) and base.rows_read == len(df)
        for r, u in enumerate(got):
            assert as_expected(summary(base.state(r, history_len=H))) == brute_force(df, u), u
    assert load_base(data, only=[]).n_users == 0


def test_base_load_counts_and_skips_rows_it_cannot_serve(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from llmrec.state.base import load_base

    t = pa.table({
        USER_ID: pa.array(["a", "a", None, "a", "a", "a", "x" * 300, "b", "b\0"]),
        ITEM_ID: pa.array(["i1", None, "i2", "i3", "i4", "i5", "i6", "i7", "i8"]),
        TS: pa.array([1, 2, 3, None, 5, 6, 7, 8, 9], pa.int64()),
        RATING: pa.array([None, None, None, None, 9.0, None, None, None, None], pa.float64()),
        EVENT: pa.array(["like", "like", "like", "like", "rating", "poke", "like", "rating", "like"]),
    })
    pq.write_table(t, tmp_path / "interactions.parquet")
    base = load_base(tmp_path, history_len=H)
    assert base.skipped == {"null_or_bad_user_id": 3, "null_or_bad_item_id": 1, "null_ts": 1,
                            "unknown_event": 1, "rating_missing_or_out_of_range": 2}
    assert [base.user_id(r) for r in range(base.n_users)] == ["a"]
    assert [h[0] for h in base.history(base.row("a"))] == ["i1"]
    with pytest.raises(ValueError, match=r"column\(s\) \['event'\] missing"):
        pq.write_table(t.drop_columns([EVENT]), tmp_path / "bad.parquet")
        load_base(tmp_path / "bad.parquet")
    with pytest.raises(FileNotFoundError, match="nowhere does not exist: the state shards load"):
        load_base(tmp_path / "nowhere")


def base_users(df: pd.DataFrame, shard: int, n_shards: int = 2) -> list[str]:
    return sorted(u for u in set(df[USER_ID]) if shard_of(u, n_shards) == shard)


def test_base_user_get_feedback_dedup_and_restart(tmp_path: Path) -> None:
    df = make_interactions()
    data = write_run_data(tmp_path / "data", df)
    log = tmp_path / "events"
    shard = UserStateShard(0, str(log), vec_factory(), history_len=H, n_shards=2, base_dir=str(data))
    users = base_users(df, 0)
    for u in users:  # base-only users: transient states from the arrays, nothing materialised
        got = shard.get(u)
        assert as_expected(got) == brute_force(df, u) and got.version == got.n_events
    body = json.loads(json.dumps(shard.get(users[0]).to_json()))  # GET /users/{id}: plain JSON, old keys
    assert list(body) == list(json.loads(USERS_BODY)) and body["shard"] == 0
    assert shard.users == {} and shard.stats()["n_users"] == len(users)
    assert shard.stats()["n_events"] == int(df[USER_ID].isin(users).sum())
    u = next(x for x in users if brute_force(df, x)["n_events"] > H)
    want = brute_force(df, u)
    st_ref = UserState(user_id=u, history_len=H)
    for item, kind, value, ts in want["history"]:
        st_ref = apply_event(st_ref, Event(user_id=u, item_id=item, event=kind, value=value, ts=ts))
    vec = MeanVectorizer(IDS, V)(st_ref)
    np.testing.assert_allclose(shard.get(u).vector, vec, rtol=1e-6)

    # a live event equal to a base event (same item, event, ts; ts compared in whole seconds) is a duplicate
    item, kind, value, ts = want["history"][-1]
    dup = {"event_id": "d1", "user_id": u, "item_id": item, "event": kind, "value": value, "ts": ts + 0.4}
    res = shard.apply([dup])
    assert res[0]["duplicate"] is True and res[0]["state_version"] == want["n_events"]
    assert shard.log.last_seq == 0 and shard.users == {}
    # feedback on a base user extends its base history
    res = shard.apply([{"event_id": "n1", "user_id": u, "item_id": "i39", "event": "like", "ts": 5000.0}])
    assert res[0]["duplicate"] is False and res[0]["state_version"] == want["n_events"] + 1
    got = shard.get(u)
    assert as_expected(got)["history"] == want["history"][1:] + [["i39", "like", None, 5000.0]]
    assert got.n_events == want["n_events"] + 1 and set(got.seen) == set(want["seen"]) | {"i39"}
    assert list(shard.users) == [u] and shard.stats()["n_users"] == len(users)
    before = {x: shard.get(x) for x in users}
    stats = {k: shard.stats()[k] for k in ("n_users", "n_events", "n_base_users", "n_materialised")}
    shard.close()

    again = UserStateShard(0, str(log), vec_factory(), history_len=H, n_shards=2, base_dir=str(data))
    assert again.replay_counts["replayed"] == 1 and again.replay_counts["duplicate_base"] == 0
    assert {x: again.get(x) for x in users} == before  # restart = base + log, equal state
    assert {k: again.stats()[k] for k in stats} == stats
    again.close()


def test_logged_event_equal_to_a_base_event_is_not_counted_twice(tmp_path: Path) -> None:
    """The log of one run becomes the next run's interactions: restarting over that base counts each once."""
    from llmrec.state.event_log import read_events

    log = tmp_path / "events"
    live = [{"event_id": f"e{k}", "user_id": "z", "item_id": IDS[k], "event": "like", "ts": 2000.0 + k + 0.7}
            for k in range(3)]
    shard = UserStateShard(0, str(log), vec_factory(), history_len=H)
    shard.apply(live)
    shard.snapshot()
    shard.close()
    # the next run's data = its old interactions + the logged events (ts floored, as read_events gives them)
    df = make_interactions(n_users=6, n_rows=40)
    new_run = pd.concat([df, read_events(log)], ignore_index=True)
    data = write_run_data(tmp_path / "data2", new_run)
    again = UserStateShard(0, str(log), vec_factory(), history_len=H, base_dir=str(data))
    assert again.replay_counts == {"replayed": 0, "duplicate_id": 0, "duplicate_base": 3, "deleted": 0,
                                   "invalid": 0, "torn": 0}
    got = again.get("z")
    assert got.n_events == 3 and [h.item_id for h in got.history] == IDS[:3]
    assert again.users == {}  # replayed events that the base holds do not materialise the user
    assert again.apply(live[:1])[0]["duplicate"] is True  # a retry: the base holds it
    assert again.stats()["n_events"] == len(new_run)
    again.close()


def test_tombstone_survives_restart_and_base_swap(tmp_path: Path) -> None:
    from llmrec.state.event_log import read_events

    df = make_interactions()
    data = write_run_data(tmp_path / "data", df)
    data2 = write_run_data(tmp_path / "data2", make_interactions(seed=9))  # the user is in this run too
    log = tmp_path / "events"
    users = base_users(df, 0, n_shards=1)
    victim, other = users[0], users[1]
    shard = UserStateShard(0, str(log), vec_factory(), history_len=H, n_shards=1, base_dir=str(data),
                           background=False)
    shard.apply([{"event_id": "v1", "user_id": victim, "item_id": "i1", "event": "like", "ts": 9000.0}])
    n_before = shard.stats()["n_users"]
    assert shard.delete(victim) is True and shard.get(victim) is None
    assert shard.stats()["n_users"] == n_before - 1
    assert victim not in set(read_events(log)[USER_ID])
    tomb = (log / "tombstones-s000.jsonl").read_text()
    assert victim not in tomb and victim not in (log / "snapshot-s000.json").read_text()  # hashes, not ids
    assert shard.delete(other) is True  # a base-only user: a tombstone too
    shard.close()

    again = UserStateShard(0, str(log), vec_factory(), history_len=H, n_shards=1, base_dir=str(data))
    assert again.get(victim) is None and again.get(other) is None
    assert again.base.row(victim) is None and again.base_info["skipped"] == {"deleted_user": int(
        df[USER_ID].isin([victim, other]).sum())}
    # a later event starts a fresh state without the base history
    again.apply([{"event_id": "v2", "user_id": victim, "item_id": "i2", "event": "click"}])  # stamped now
    fresh = again.get(victim)
    assert [h.item_id for h in fresh.history] == ["i2"] and fresh.n_events == 1
    assert again.set_base(str(data2))["changed"] is True  # a new run that also holds both users
    assert again.get(other) is None
    assert [h.item_id for h in again.get(victim).history] == ["i2"]
    again.close()
    third = UserStateShard(0, str(log), vec_factory(), history_len=H, n_shards=1, base_dir=str(data2))
    assert third.get(other) is None and third.get(victim).n_events == 1
    third.close()


def test_interrupted_delete_is_finished_at_restart(tmp_path: Path) -> None:
    """A crash after the tombstone but before the log purge: the events never come back, the purge ends."""
    from llmrec.state.event_log import read_events

    log = tmp_path / "events"
    shard = UserStateShard(0, str(log), vec_factory(), history_len=H, snapshot_every=1)
    shard.apply([{"event_id": f"e{k}", "user_id": "w", "item_id": IDS[k], "event": "like", "ts": float(k)}
                 for k in range(3)])
    shard.tombstones.add("w", shard.log.last_seq)  # the first step of delete(); then the process dies
    shard.close()
    again = UserStateShard(0, str(log), vec_factory(), history_len=H)
    assert again.get("w") is None and "w" not in set(read_events(log)[USER_ID])
    again.apply([{"event_id": "e9", "user_id": "w", "item_id": "i9", "event": "like"}])  # after the delete
    again.close()
    third = UserStateShard(0, str(log), vec_factory(), history_len=H)
    assert third.get("w").n_events == 1  # events after the delete are kept
    third.close()


def test_set_base_swaps_runs_and_rebuilds_materialised_users(tmp_path: Path) -> None:
    df_a, df_b = make_interactions(seed=1), make_interactions(seed=2, user_prefix="q")
    df_b.loc[df_b.index[:30], USER_ID] = "p0"  # p0 is in both runs, with other histories
    a, b = write_run_data(tmp_path / "a", df_a), write_run_data(tmp_path / "b", df_b)
    log = tmp_path / "events"
    shard = UserStateShard(0, str(log), vec_factory(), history_len=H, base_dir=str(a), background=False)
    live = {"event_id": "l1", "user_id": "p0", "item_id": "i7", "event": "purchase", "ts": 7000.0}
    shard.apply([live])
    assert shard.set_base(str(a))["changed"] is False  # same descriptor: nothing reloads
    out = shard.set_base(str(b))
    assert out["changed"] is True and out["replay"]["replayed"] == 1
    want = brute_force(df_b, "p0")
    got = shard.get("p0")
    assert as_expected(got)["history"] == want["history"][1:] + [["i7", "purchase", None, 7000.0]]
    assert got.n_events == want["n_events"] + 1
    assert shard.get("p1") is None and as_expected(shard.get("q1")) == brute_force(df_b, "q1")
    assert shard.stats()["n_users"] == df_b[USER_ID].nunique()
    shard.close()
    # a restart with the new run's folder is the same state (snapshot over the same descriptor)
    again = UserStateShard(0, str(log), vec_factory(), history_len=H, base_dir=str(b))
    assert again.replay_counts["replayed"] == 0 and again.get("p0") == got
    assert again.set_base(None)["changed"] is True  # no base: only what the log holds
    assert again.stats()["n_users"] == 1 and again.get("p0").history == (
        HistoryEntry(item_id="i7", event="purchase", value=None, ts=7000.0),)
    again.close()


def test_store_loads_base_in_every_shard_and_a_restarted_shard_keeps_the_swapped_base(
        store_factory, tmp_path: Path) -> None:
    df_a, df_b = make_interactions(seed=1), make_interactions(seed=2, user_prefix="q")
    a, b = write_run_data(tmp_path / "a", df_a), write_run_data(tmp_path / "b", df_b)
    store = store_factory(n_shards=2, vectorizer_factory=vec_factory(), history_len=H, base_dir=str(a),
                          retry_timeout_s=60)  # waits for the restart below
    assert store.stats_sync()["n_users"] == df_a[USER_ID].nunique()
    assert as_expected(store.get_sync("p3")) == brute_force(df_a, "p3")
    store.apply_sync([{"event_id": "x", "user_id": "q2", "item_id": "i1", "event": "like", "ts": 8000.0}])
    out = store.set_base_sync(str(b))
    assert [o["changed"] for o in out] == [True, True]
    assert store.get_sync("p3") is None and store.stats_sync()["n_users"] == df_b[USER_ID].nunique()
    before = {u: store.get_sync(u) for u in sorted(set(df_b[USER_ID]))}
    s = store.shard_of("q2")
    pid = store.stats_sync()["shards"][s]["pid"]
    _kill_and_wait(store.actors[s], pid)  # Ray restarts it with the constructor's base_dir=a ...
    after = {u: store.get_sync(u) for u in before}  # ... but it keeps the swapped-in base b
    assert store.stats_sync()["shards"][s]["pid"] != pid
    assert after == before and after["q2"].history[-1].item_id == "i1"


def test_get_carries_text_feedback_vectors_for_the_ranker(tmp_path: Path) -> None:
    shard = UserStateShard(0, str(tmp_path), vec_factory())
    shard.apply([{"user_id": "t", "event": "dislike", "text": "no gore", "text_vec": V[5].tolist(),
                  "ts": 1.0},
                 {"user_id": "t", "event": "like", "text": "more space", "ts": 2.0}])
    tf = shard.get("t").text_feedback
    assert [(t.text, t.polarity) for t in tf] == [("no gore", -1.0), ("more space", 1.0)]
    np.testing.assert_array_equal(tf[0].vec, V[5].tolist())  # the stored vector, as sent
    assert tf[1].vec is None
    shard.close()


def test_hot_swap_serves_the_old_base_while_the_new_one_loads(tmp_path: Path) -> None:
    df_a, df_b = make_interactions(seed=1), make_interactions(seed=2, user_prefix="q")
    df_b.loc[df_b.index[:30], USER_ID] = "p0"  # p0 is in both runs
    a, b = write_run_data(tmp_path / "a", df_a), write_run_data(tmp_path / "b", df_b)
    shard = UserStateShard(0, str(tmp_path / "events"), vec_factory(), history_len=H, base_dir=str(a))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        shard.prepare_base(str(tmp_path / "nowhere"))
    status = shard.prepare_base(str(b))
    assert status["current"] is False and shard._pending is not None
    # until the commit, requests are served from run a: reads, feedback, deletes
    assert as_expected(shard.get("p1")) == brute_force(df_a, "p1") and shard.get("q1") is None
    assert shard.delete("p0") is True  # also in run b: must stay deleted there
    shard.apply([{"event_id": "l", "user_id": "q2", "item_id": "i3", "event": "like", "ts": 7000.0}])
    out = shard.commit_base(str(b))
    assert out["changed"] is True and shard.base_status(str(b))["current"] is True
    assert shard.get("p0") is None and shard.get("p1") is None
    got = shard.get("q2")  # the feedback given during the load, replayed over the new base
    want = (brute_force(df_b, "q2")["history"] + [["i3", "like", None, 7000.0]])[-H:]
    assert as_expected(got)["history"] == want
    assert shard.stats()["n_users"] == df_b[USER_ID].nunique() - 1
    shard.close()


# ---- faults (issue 15, data integrity) ------------------------------------------------------------------


class FailingFsync:
    """os.fsync that raises ENOSPC (a full disk) on files whose path contains `part`, while `on` is True."""

    def __init__(self, part: str) -> None:
        import os

        self.real, self.part, self.on, self.failed = os.fsync, part, True, 0

    def __call__(self, fd: int) -> None:
        import errno
        import os

        if self.on and self.part in os.readlink(f"/proc/self/fd/{fd}"):
            self.failed += 1
            raise OSError(errno.ENOSPC, "No space left on device")
        self.real(fd)


def test_failed_snapshot_does_not_fail_an_applied_write(tmp_path: Path, monkeypatch) -> None:
    """The events are in the log: the caller gets its normal answer, the shard keeps serving, the temporary
    file goes, and the snapshot is retried later (it used to raise for this and every later write)."""
    import os

    shard = UserStateShard(0, str(tmp_path), vec_factory(), snapshot_every=2, background=False)
    events = make_events(6, ["a", "b"])
    shard.apply(events[:2])  # a good snapshot first
    spy = FailingFsync("snapshot-")
    monkeypatch.setattr(os, "fsync", spy)
    res = shard.apply(events[2:4])  # reaches snapshot_every: the snapshot fails
    assert [r["duplicate"] for r in res] == [False, False] and spy.failed == 1
    assert shard.apply(events[4:5])[0]["duplicate"] is False  # not failing again (backoff), not stuck
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]  # no temporary file left
    st = shard.stats()
    assert st["snapshot_failures"] == 1 and "No space left" in st["snapshot_error"]
    spy.on = False
    shard._snapshot_retry_at = 0.0  # the backoff has passed
    shard.apply(events[5:6])
    assert shard.stats()["snapshot_error"] is None and shard.stats()["since_snapshot"] == 0
    want = {u: comparable(s) for u, s in reference_states(events).items()}
    shard.close()
    again = UserStateShard(0, str(tmp_path), vec_factory())
    assert {u: comparable(s) for u, s in again.users.items()} == want
    again.close()


def test_failed_log_write_applies_nothing_and_is_not_a_client_error(tmp_path: Path, monkeypatch) -> None:
    import os

    from llmrec.state.errors import StateUnavailable

    shard = UserStateShard(0, str(tmp_path), vec_factory())
    events = make_events(3, ["a"])
    shard.apply(events[:1])
    spy = FailingFsync(".jsonl")
    monkeypatch.setattr(os, "fsync", spy)
    with pytest.raises(StateUnavailable) as exc:
        shard.apply(events[1:3])
    assert not isinstance(exc.value, ValueError)
    assert shard.get("a").n_events == 1 and shard.log.last_seq == 1
    spy.on = False
    assert [r["duplicate"] for r in shard.apply(events[1:3])] == [False, False]  # the client's retry
    shard.close()
    again = UserStateShard(0, str(tmp_path), vec_factory())
    assert comparable(again.users["a"]) == comparable(reference_states(events)["a"])
    again.close()


def test_events_without_id_get_one_that_makes_retries_idempotent(tmp_path: Path) -> None:
    shard = UserStateShard(0, str(tmp_path), vec_factory())
    body = {"user_id": "r", "item_id": "i1", "event": "like", "ts": 1234.5}
    first, again = shard.apply([body])[0], shard.apply([dict(body)])[0]
    assert first["duplicate"] is False and again == {**first, "duplicate": True}
    assert first["event_id"].startswith("c")  # derived from the content, returned to the client
    no_ts = {"user_id": "r", "item_id": "i2", "event": "like"}
    a, b = shard.apply([no_ts])[0], shard.apply([dict(no_ts)])[0]  # server clock: two real clicks
    assert not a["duplicate"] and not b["duplicate"] and a["event_id"] != b["event_id"]
    assert shard.apply([{**no_ts, "event_id": a["event_id"]}])[0]["duplicate"] is True  # a retry with its id
    assert shard.get("r").n_events == 3
    shard.close()


def test_log_retention_keeps_recovery_exact(tmp_path: Path) -> None:
    """Segments a snapshot covers go once they are older than the retention; a restart still rebuilds the
    same state (snapshot + what the log still holds)."""
    import os

    from llmrec.state.event_log import segment_paths

    shard = UserStateShard(0, str(tmp_path), vec_factory(), snapshot_every=10**9, log_retention_s=3600)
    shard.log.segment_max_events = 5
    events = make_events(23, ["a", "b", "c"])
    for k in range(0, 23, 5):
        shard.apply(events[k: k + 5])
    assert len(segment_paths(tmp_path)) == 5
    for _s, _f, p in segment_paths(tmp_path):
        os.utime(p, (1, 1))
    shard.snapshot()
    assert [f for _s, f, _p in segment_paths(tmp_path)] == [21]  # only the open segment stays
    shard.apply(make_events(2, ["a"], seed=3))
    want = {u: comparable(s) for u, s in shard.users.items()}
    shard.close()
    again = UserStateShard(0, str(tmp_path), vec_factory())
    assert {u: comparable(s) for u, s in again.users.items()} == want and again.replayed == 2
    again.close()


# ---- privacy (issue 15) ---------------------------------------------------------------------------------


def test_tombstones_and_logs_keep_no_dictionary_reversible_hash_or_raw_id(tmp_path: Path, caplog) -> None:
    import hashlib

    victim = "alice@example.com"
    shard = UserStateShard(0, str(tmp_path), vec_factory(), background=False)
    shard.apply([{"event_id": "a1", "user_id": victim, "item_id": "i1", "event": "like", "ts": 10.0}])
    with caplog.at_level(logging.DEBUG):
        assert shard.delete(victim) is True
    unsalted = hashlib.sha256(victim.encode()).hexdigest()
    files = "".join(p.read_text(errors="replace") for p in tmp_path.iterdir() if p.is_file()
                    and p.name != "hash-key")
    assert unsalted not in files and victim not in files
    assert str(zlib.crc32(victim.encode())) not in (tmp_path / "tombstones-s000.jsonl").read_text()
    assert victim not in caplog.text and unsalted[:12] not in caplog.text
    assert shard.keyer.log_id(victim) in caplog.text  # a keyed id instead: correlatable, not reversible
    assert (tmp_path / "hash-key").stat().st_mode & 0o077 == 0
    shard.close()
    again = UserStateShard(0, str(tmp_path), vec_factory())  # the key persists: the tombstone still matches
    assert again.tombstones.seq(victim) >= 0 and again.get(victim) is None
    again.close()


def test_retried_or_in_flight_event_does_not_recreate_a_deleted_user(tmp_path: Path) -> None:
    shard = UserStateShard(0, str(tmp_path), vec_factory())
    e = {"event_id": "x1", "user_id": "bob", "item_id": "i1", "event": "like", "ts": time.time() - 5}
    shard.apply([e])
    assert shard.delete("bob") is True
    res = shard.apply([e, {**e, "event_id": "x2"}])  # the retry, and another event sent before the delete
    assert [(r["duplicate"], r["deleted"]) for r in res] == [(False, True), (False, True)]
    assert shard.get("bob") is None and shard.log.last_seq == 1
    fresh = shard.apply([{"user_id": "bob", "item_id": "i2", "event": "click"}])  # stamped after the delete
    assert fresh[0]["deleted"] is False and shard.get("bob").n_events == 1
    shard.close()
    again = UserStateShard(0, str(tmp_path), vec_factory())
    assert [h.item_id for h in again.get("bob").history] == ["i2"]
    again.close()


def test_delete_of_an_unknown_user_writes_nothing(tmp_path: Path) -> None:
    shard = UserStateShard(0, str(tmp_path), vec_factory())
    shard.apply([{"event_id": "k", "user_id": "known", "item_id": "i1", "event": "like", "ts": 1.0}])
    shard.snapshot()
    snap = tmp_path / "snapshot-s000.json"
    before = snap.stat().st_mtime_ns
    t0 = time.perf_counter()
    for k in range(200):
        assert shard.delete(f"nobody-{k}") is False
    assert time.perf_counter() - t0 < 1.0
    assert not (tmp_path / "tombstones-s000.jsonl").exists() and snap.stat().st_mtime_ns == before
    shard.close()


def test_forget_command_reaches_stopped_logs_and_cached_copies(tmp_path: Path, monkeypatch, capsys) -> None:
    """`llmrec forget` purges a stopped log folder (with a tombstone, so its base never reloads the user) and
    the artifact cache's copies of event logs; it refuses a folder a live shard writes."""
    import json
    import shutil

    from llmrec import cli
    from llmrec.state.store import _check_log_meta

    df = make_interactions(n_users=6, n_rows=40)
    data = write_run_data(tmp_path / "data", df)
    log = tmp_path / "events"
    _check_log_meta(str(log), 1)
    shard = UserStateShard(0, str(log), vec_factory(), n_shards=1, base_dir=str(data))
    shard.apply([{"event_id": f"e{k}", "user_id": u, "item_id": "i1", "event": "like", "ts": 5000.0 + k}
                 for k, u in enumerate(["p1", "p2", "p1"])])
    shard.snapshot()
    assert cli.main(["forget", "--user", "p1", "--events", str(log)]) == 2  # live: use DELETE
    assert "DELETE /users" in capsys.readouterr().err
    shard.close()
    cache = tmp_path / "cache"
    shutil.copytree(log, cache / "abcd" / "events")  # what `train --events URI` stages
    monkeypatch.setenv("LLMREC_CACHE_DIR", str(cache))
    assert cli.main(["forget", "--user", "p1", "--events", str(log)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["folders"] == {str(log): 3} and out["cache_copies"] == {str(cache / "abcd" / "events"): 2}
    assert '"p1"' not in (log / "snapshot-s000.json").read_text()
    for folder in (log, cache / "abcd" / "events"):
        assert set(read_events(folder)[USER_ID]) == {"p2"}
    again = UserStateShard(0, str(log), vec_factory(), n_shards=1, base_dir=str(data))
    assert again.get("p1") is None and again.get("p2").n_events > 1
    again.close()


def test_deletes_and_snapshots_run_off_the_request_path(tmp_path: Path) -> None:
    """A delete used to write a full snapshot and rewrite the log inside the request; now the request only
    writes the tombstone, and one background pass purges many deletes (log + snapshot files) shortly after.
    Snapshots are incremental: a delta holds only the users changed since the previous one."""
    from llmrec.state.snapshots import delta_paths, read_snapshots

    shard = UserStateShard(0, str(tmp_path), vec_factory(), snapshot_every=20, purge_interval_s=30,
                           full_every=3)  # the thread runs when woken (every 20 events) or every 30 s
    users = [f"w{k}" for k in range(30)]
    shard.apply(make_events(60, users))
    deadline = time.monotonic() + 10
    while not (tmp_path / "snapshot-s000.json").is_file() and time.monotonic() < deadline:
        time.sleep(0.05)
    shard.apply(make_events(20, users[:2], seed=4))  # 20 more events for 2 users: a delta of 2 users
    while not delta_paths(tmp_path, 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    (seq, path), = delta_paths(tmp_path, 0)
    assert seq == 80 and len(path.read_text().splitlines()) == 1 + 2  # header + the 2 changed users
    fulls = shard.stats()["snapshots_written"]["full"]
    t0 = time.perf_counter()
    for u in users[:10]:
        assert shard.delete(u) is True
    per_delete_s = (time.perf_counter() - t0) / 10
    assert {r["user_id"] for r in iter_events(tmp_path)} >= set(users[:10])  # not purged in the request
    assert shard.stats()["pending_purges"] == 10
    shard._wake.set()  # the thread's next round (at most purge_interval_s later without this)
    while shard.stats()["pending_purges"] and time.monotonic() < deadline:
        time.sleep(0.05)
    st = shard.stats()
    assert st["last_snapshot"]["kind"] == "full" and st["purged_users"] == 10
    assert st["snapshots_written"]["full"] - fulls == 1  # the ten deletes share one pass
    assert not {r["user_id"] for r in iter_events(tmp_path)} & set(users[:10])
    _header, parts = read_snapshots(tmp_path, 0)
    assert sorted(parts[0][1]) == sorted(users[10:]) and not delta_paths(tmp_path, 0)
    assert per_delete_s < 0.05, per_delete_s
    want = {u: comparable(s) for u, s in shard.users.items()}
    shard.close()
    again = UserStateShard(0, str(tmp_path), vec_factory(), background=False)
    assert {u: comparable(s) for u, s in again.users.items()} == want and again.replayed == 0
    again.close()
