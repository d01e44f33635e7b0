"""State store: shard recovery (snapshot + log replay), read-your-writes on Ray, and a crash mid-stream."""

from __future__ import annotations

import asyncio
import functools
import logging
import pickle
import threading
import time
import uuid
import zlib
from pathlib import Path

import numpy as np
import pytest

from llmrec.state.event_log import iter_events, read_events
from llmrec.state.store import EmbeddingsMeanVectorizer, StateStore, UserStateShard, shard_of
from llmrec.state.user_state import Event, MeanVectorizer, UserState, apply_event, state_to_dict

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
    shard = UserStateShard(0, str(tmp_path), vec_factory(), snapshot_every=10)
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

    rebuilt = UserStateShard(0, str(tmp_path), vec_factory(), snapshot_every=10)
    assert rebuilt.replayed == 1  # batches of 4: snapshots after 12 and 24 events, 1 event after the last
    for u in users:
        assert comparable(rebuilt.users[u]) == comparable(ref[u])
        assert rebuilt.get(u) == got[u]
        np.testing.assert_allclose(got[u]["vector"], MeanVectorizer(IDS, V)(ref[u]), rtol=1e-6)
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
    factory = EmbeddingsMeanVectorizer(str(emb), half_life=5.0)
    vec = pickle.loads(pickle.dumps(factory))()  # what the actor receives
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
        for e, r in zip(events[k: k + 12], res):
            got = store.get_sync(e["user_id"])
            assert got["version"] == r["state_version"] and got["shard"] == store.shard_of(e["user_id"])
    for u in users:
        got = store.get_sync(u)
        assert got["n_events"] == ref[u].n_events == 5
        assert [h["item_id"] for h in got["history"]] == [h[0] for h in ref[u].history]
        want = vectorizer(ref[u])
        if want is None:
            assert got["vector"] is None
        else:
            np.testing.assert_allclose(got["vector"], want, rtol=1e-5)

    async def async_flow() -> tuple:
        res = await store.apply([{"user_id": "new", "item_id": "i3", "event": "like"}])
        got, stats = await store.get("new"), await store.stats()
        return res, got, stats, await store.delete("new"), await store.get("new")

    res, got, stats, deleted, gone = asyncio.run(async_flow())
    assert res[0]["duplicate"] is False and len(res[0]["event_id"]) == 32  # id assigned by the client
    np.testing.assert_allclose(got["vector"], V[3], rtol=1e-5)
    assert stats["n_users"] == 13 and stats["n_events"] == 61 and stats["n_shards"] == 3
    assert deleted is True and gone is None and store.get_sync("nobody") is None
    with pytest.raises(ValueError, match=r"events\[0\]: event.user_id"):
        store.apply_sync([{"user_id": "", "item_id": "i1", "event": "like"}])

    joined = StateStore(n_shards=3, log_dir=store.log_dir, namespace=store.namespace, name=store.name)
    assert joined._created == [] and joined.get_sync("user0")["n_events"] == 5
    joined.shutdown()  # kills nothing it did not create
    assert store.get_sync("user0")["n_events"] == 5
    with pytest.raises(ValueError, match="n_shards=3, got n_shards=2"):
        StateStore(n_shards=2, log_dir=store.log_dir, namespace=store.namespace, name="other")
    with pytest.raises(ValueError, match="already exists for log_dir"):
        StateStore(n_shards=3, log_dir=str(tmp_path / "elsewhere"), namespace=store.namespace,
                   name=store.name)


def test_retry_after_restart_is_recognised_as_duplicate(store_factory) -> None:
    import ray

    store = store_factory(n_shards=2)
    e = {"event_id": "once", "user_id": "alice", "item_id": "i1", "event": "purchase", "ts": 5.0}
    assert store.apply_sync([e])[0]["duplicate"] is False
    s = store.shard_of("alice")
    pid = store.stats_sync()["shards"][s]["pid"]
    ray.kill(store.actors[s], no_restart=False)
    res = asyncio.run(store.apply([e]))  # the async path waits for the restart (log replay) and retries
    assert res[0]["duplicate"] is True and res[0]["state_version"] == 1
    st = store.stats_sync()["shards"][s]
    assert st["pid"] != pid and st["replayed_at_start"] == 1
    assert store.get_sync("alice")["n_events"] == 1


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
        assert got["n_events"] == n_acked == ref[u].n_events == 30
        assert [h["item_id"] for h in got["history"]] == [h[0] for h in ref[u].history]
        want = vectorizer(ref[u])
        assert (got["vector"] is None) == (want is None)
        if want is not None:
            np.testing.assert_allclose(got["vector"], want, rtol=1e-5)
    assert stats["n_events"] == 300
    # the log holds each event once (a duplicate flag marks any retry that reached a restarted shard)
    log_ids = [r["event_id"] for r in iter_events(store.log_dir)]
    assert sorted(log_ids) == sorted(e["event_id"] for e in events)
    # and re-sending everything now changes nothing
    again = store.apply_sync(events[:50])
    assert all(a["duplicate"] for a in again)
    assert store.stats_sync()["n_events"] == 300
