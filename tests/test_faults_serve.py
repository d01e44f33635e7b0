"""Serve-level faults (`make test-faults`): a seeded fuzzer of 10,000 malformed or hostile requests from four
clients while a fifth loops DELETE, then kill -9 of the Ingress replica mid-stream.

Invariants: zero 5xx for client mistakes, state unchanged by refused requests (only the deletes change it),
every acknowledged event counted exactly once after the replica comes back."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest
import requests
from test_bad_input import ITEMS, _bad_event, _rand_text, _requests
from test_serve_app import App

from llmrec import schema

pytestmark = [pytest.mark.faults, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def app(ray_local, tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory):
    a = App("faults", tmp_path_factory.mktemp("fault-run"), tiny_model_dir, max_body_bytes=64 * 1024)
    yield a
    a.close()


def _hostile(rng: random.Random, n: int):
    """The bad-input generator plus hostile ids, paths and concurrency-prone shapes."""
    weird = ["../../etc/passwd", "..", ".", "a/b", "%2e%2e", "\u202e", "x" * 256, "🎉" * 64, "null",
             "<script>", "' OR 1=1 --", "\\", "u\x7f", "\ufeff"]
    for i, req in enumerate(_requests(rng, n)):
        if i % 5 == 4:
            k = rng.randrange(6)
            if k == 0:
                yield "GET", "/users", {"params": {"user_id": rng.choice(weird) + "-unknown"}}
            elif k == 1:
                yield "DELETE", "/users", {"params": {"user_id": rng.choice(["", " ", "\x00", "x" * 300])}}
            elif k == 2:
                k_big = str(10 ** rng.randrange(3, 30))  # always above MAX_K
                yield "GET", "/recommend", {"params": {"user_id": rng.choice(weird), "k": k_big}}
            elif k == 3:
                ev = _bad_event(rng)
                ev["ts"] = rng.choice([10**400, -(10**400), 1e308, 1e11])
                yield "POST", "/feedback", {"json": ev}
            elif k == 4:
                batch = [_bad_event(rng) for _ in range(rng.randrange(1, 50))]
                yield "POST", "/feedback", {"json": {"events": batch}}
            else:
                q = _rand_text(rng, rng.randrange(1, 40))
                yield "GET", "/recommend", {"params": {"user_id": "u", "q": q, "k": "0"}}
        else:
            yield req


def test_ten_thousand_hostile_requests_with_concurrent_deletes(app: App) -> None:
    good = [{"user_id": "good-user", "item_id": ITEMS[k % 3], "event": "like", "ts": 1_700_000_000 + k}
            for k in range(3)]
    assert app.call("POST", "/feedback", json={"events": good}).status_code == 200
    victims = [f"victim-{k}" for k in range(40)]
    for v in victims:
        assert app.call("POST", "/feedback", json={"user_id": v, "item_id": "cook-1", "event": "click"}).ok
    before = app.call("GET", "/admin/stats").json()["state"]
    before_user = app.call("GET", "/users/good-user").json()
    statuses: dict[int, int] = {}
    bad: list[tuple] = []
    lock = threading.Lock()

    def client(seed: int, n: int) -> None:
        s = requests.Session()
        for method, path, kw in _hostile(random.Random(seed), n):
            r = s.request(method, app.url + path, timeout=120, **kw)
            with lock:
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                if r.status_code >= 500 or not 400 <= r.status_code < 500:
                    bad.append((method, path, str(kw)[:120], r.status_code, r.text[:160]))

    deleted: list[int] = []

    def deleter() -> None:  # loops DELETE over the victims and unknown users while the fuzz runs
        s = requests.Session()
        for k in range(400):
            uid = victims[k % len(victims)] if k < len(victims) else f"nobody-{k}"
            r = s.delete(app.url + "/users", params={"user_id": uid}, timeout=120)
            deleted.append(r.status_code)

    threads = [threading.Thread(target=client, args=(100 + k, 2500)) for k in range(4)]
    threads.append(threading.Thread(target=deleter))
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    assert sum(statuses.values()) == 10_000
    assert not bad, f"{len(bad)} requests not answered with a 4xx, e.g. {bad[:5]}; statuses {statuses}"
    assert set(deleted) == {200} and len(deleted) == 400
    after = app.call("GET", "/admin/stats").json()["state"]
    assert after["n_users"] == before["n_users"] - len(victims)
    assert after["n_events"] == before["n_events"] - len(victims)
    assert app.call("GET", "/users/good-user").json() == before_user
    for v in victims[:5]:
        assert app.call("GET", "/users", params={"user_id": v}).status_code == 404
    print(f"fuzz: 10,000 requests + 400 deletes in {wall:.0f}s, statuses {statuses}")


def test_kill_9_of_the_ingress_replica_mid_stream(app: App) -> None:
    users = [f"stream-{k}" for k in range(5)]
    events = [{"user_id": users[k % 5], "item_id": ITEMS[k % 3], "event": "view", "event_id": f"s-{k}",
               "ts": 1_700_000_000 + k} for k in range(150)]
    acked: list[str] = []
    errors: list[str] = []

    def stream() -> None:
        s = requests.Session()
        deadline = time.monotonic() + 600
        for e in events:
            while True:  # a client that retries until acknowledged, always with the same event_id
                try:
                    r = s.post(app.url + "/feedback", json=e, timeout=60)
                    if r.status_code == 200:
                        acked.append(e["event_id"])
                        break
                    assert r.status_code >= 500, r.text  # client mistakes would be a bug here
                    errors.append(str(r.status_code))
                except requests.RequestException as err:
                    errors.append(type(err).__name__)
                    s = requests.Session()
                if time.monotonic() > deadline:
                    raise TimeoutError("the replica did not come back")
                time.sleep(0.2)

    t = threading.Thread(target=stream)
    t.start()
    while len(acked) < 40 and t.is_alive():
        time.sleep(0.01)
    pid = app.call("GET", "/admin/stats").json()["pid"]
    os.kill(pid, signal.SIGKILL)
    t.join(timeout=900)
    assert not t.is_alive() and len(acked) == 150
    assert app.call("GET", "/admin/stats").json()["pid"] != pid  # Serve started a new replica
    for u in users:
        assert app.call("GET", f"/users/{u}").json()["n_events"] == 30  # each event exactly once
    from llmrec.state.event_log import read_events

    logged = read_events(Path(app.run) / schema.RUN_EVENTS)
    assert (logged[schema.USER_ID].str.startswith("stream-")).sum() == 150
    print(f"replica kill: {len(errors)} failed attempts retried ({sorted(set(errors))})")
