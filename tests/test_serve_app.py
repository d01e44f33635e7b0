"""The Serve app end to end over HTTP on the shared 2-CPU Ray: read-your-writes, DELETE, text feedback, swap.

The run folder is built here: a tiny synthetic catalog in three topics, embedded by the random-init tiny BERT
(tiny_model_dir) through TextEncoder, a flat ItemIndex, and a few interactions for the popularity prior.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import requests
from test_user_state import USERS_BODY

from llmrec import schema

TOPICS = {
    "space": "space galaxy rocket astronaut planet star orbit",
    "cook": "cooking kitchen recipe chef food bake oven",
    "horror": "horror ghost zombie scary haunted blood night",
}
_PORT: list[int] = []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_serve() -> int:
    """serve.start once per test session on a free loopback port (later calls reuse it)."""
    from ray import serve
    from ray.serve.schema import LoggingConfig

    if not _PORT:
        _PORT.append(free_port())
        serve.start(
            http_options={"host": "127.0.0.1", "port": _PORT[0]},
            logging_config=LoggingConfig(enable_access_log=False),
        )
    return _PORT[0]


def build_tiny_run(run: Path, model_dir: str) -> dict[str, Any]:
    """6 items per topic (4-word windows) + a near-duplicate of space-0; returns ids/topics/threshold."""
    from test_replay import make_run

    from llmrec.embed.encoder import TextEncoder

    ids, texts, topic_of = [], [], {}
    for t, words in TOPICS.items():
        w = words.split()
        for j in range(6):
            ids.append(f"{t}-{j}")
            texts.append(" ".join((w + w)[j : j + 4]))  # a distinct 4-word window per item
            topic_of[ids[-1]] = t
    ids.append("space-0-dup")
    texts.append(texts[0].upper())  # the same title listed twice (the tokenizer lowercases): cosine ~1
    topic_of["space-0-dup"] = "space"
    enc = TextEncoder(model_dir, device="cpu")
    vecs = enc.encode(texts)
    sims = vecs @ vecs.T
    dup_sim = float(sims[0, -1])
    others = float(np.max(np.delete(sims[0], [0, len(ids) - 1])))
    assert dup_sim > others + 0.003, f"near-duplicate not separable: {dup_sim} vs {others}"
    inter = pd.DataFrame(
        {
            schema.USER_ID: ["p1", "p2", "p3", "p1"],
            schema.ITEM_ID: ["cook-3", "cook-3", "cook-3", "horror-1"],
            schema.TS: np.array([1, 2, 3, 4], np.int64),
            schema.RATING: [np.nan] * 4,
            schema.EVENT: ["like"] * 4,
        }
    )
    make_run(
        run,
        ids,
        vecs,
        [f"{t.title()} {i}" for t, i in zip(texts, ids, strict=True)],
        enc.model_name,
        model_path=enc.model_path,
        interactions=inter,
    )
    return {"ids": ids, "topic": topic_of, "neg_threshold": (dup_sim + others) / 2}


class App:
    """A running llmrec app under its own route prefix; `.call(method, path, **kw) -> Response`."""

    def __init__(self, name: str, run: Path, model_dir: str, **args: Any) -> None:
        from ray import serve

        from llmrec.serve.app import build_app

        self.name, self.run = name, run
        self.info = build_tiny_run(run, model_dir)
        self.state_name = f"test-state-{uuid.uuid4().hex[:6]}"
        # the tiny random BERT puts every text within cosine ~0.1 of every other: a weak popularity prior
        self.user_config = {"rank": {"neg_threshold": self.info["neg_threshold"], "pop_weight": 0.01}}
        self.args = {
            "run_dir": str(run),
            "n_shards": 2,
            "state_name": self.state_name,
            "num_cpus": 0.1,
            "user_config": self.user_config,
            **args,
        }
        port = start_serve()
        serve.run(build_app(self.args), name=name, route_prefix=f"/{name}")
        self.url = f"http://127.0.0.1:{port}/{name}"
        self.http = requests.Session()

    def call(self, method: str, path: str, **kw: Any) -> requests.Response:
        return self.http.request(method, self.url + path, timeout=60, **kw)

    def close(self) -> None:
        from ray import serve

        from llmrec.state.store import StateStore

        serve.delete(self.name)
        StateStore(n_shards=2, log_dir=self.run / schema.RUN_EVENTS, name=self.state_name).shutdown(
            kill_all=True
        )


# starting the app costs ~40 s on the shared 2-core machine (replica processes, model loads)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def app(ray_local, tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory):
    a = App("apptest", tmp_path_factory.mktemp("serve-run"), tiny_model_dir)
    yield a
    a.close()


def _ids(resp: requests.Response) -> list[str]:
    assert resp.status_code == 200, resp.text
    return [it["item_id"] for it in resp.json()["items"]]


def test_healthz_and_openapi(app: App) -> None:
    h = app.call("GET", "/healthz")
    assert h.status_code == 200 and h.json()["ok"] and h.json()["n_items"] == 19
    spec = app.call("GET", "/openapi.json").json()
    assert "paths" in spec, spec
    assert {"/feedback", "/recommend", "/users/{user_id}", "/healthz"} <= set(spec["paths"])


def test_new_user_gets_popular_items(app: App) -> None:
    r = app.call("GET", "/recommend", params={"user_id": "nobody", "k": 3})
    body = r.json()
    assert r.status_code == 200 and body["state_version"] == 0 and len(body["items"]) == 3
    assert (
        body["items"][0]["item_id"] == "cook-3" and body["items"][0]["reason"] == "popular with other users"
    )
    assert app.call("GET", "/users/nobody").status_code == 404  # recommending does not create state


def test_run_users_are_known_at_start(app: App) -> None:
    """p1..p3 are in the run's interactions: their histories serve from the first request."""
    s = app.call("GET", "/users/p1")
    assert s.status_code == 200, s.text
    body = s.json()
    assert [(h["item_id"], h["event"], h["ts"]) for h in body["history"]] == [
        ("cook-3", "like", 1.0),
        ("horror-1", "like", 4.0),
    ]
    assert body["n_events"] == body["version"] == 2 and body["seen"] == ["cook-3", "horror-1"]
    r = app.call("GET", "/recommend", params={"user_id": "p1", "k": 5}).json()
    assert r["state_version"] == 2 and r["items"][0]["reason"] != "popular with other users"
    assert not {"cook-3", "horror-1"} & {it["item_id"] for it in r["items"]}  # its history is seen
    # feedback equal to a base event is a duplicate; new feedback extends the base history
    dup = app.call("POST", "/feedback", json={"user_id": "p2", "item_id": "cook-3", "event": "like", "ts": 2})
    assert dup.json() == {"ok": True, "state_version": 1, "n_events": 1, "duplicates": 1, "deleted": 0,
                          "event_ids": [dup.json()["event_ids"][0]]}
    ev = {"user_id": "p2", "item_id": "space-4", "event": "like", "ts": 9}
    new = app.call("POST", "/feedback", json=ev)
    assert new.json()["state_version"] == 2
    hist = app.call("GET", "/users/p2").json()["history"]
    assert [h["item_id"] for h in hist] == ["cook-3", "space-4"]


def test_like_then_recommend_reflects_it(app: App) -> None:
    uid, topic = "alice", app.info["topic"]
    n = len(app.info["ids"])

    def space_rank(ids: list[str]) -> float:
        return float(np.mean([i for i, x in enumerate(ids) if topic[x] == "space"]))

    before = _ids(app.call("GET", "/recommend", params={"user_id": uid, "k": n}))
    fb = app.call(
        "POST",
        "/feedback",
        json={
            "events": [
                {"user_id": uid, "item_id": "space-1", "event": "like"},
                {"user_id": uid, "item_id": "space-2", "event": "purchase"},
            ]
        },
    )
    assert fb.status_code == 200 and {k: v for k, v in fb.json().items() if k != "event_ids"} == {
        "ok": True,
        "state_version": 2,
        "n_events": 2,
        "duplicates": 0,
        "deleted": 0,
    }
    assert len(set(fb.json()["event_ids"])) == 2
    r = app.call("GET", "/recommend", params={"user_id": uid, "k": n})
    after = _ids(r)
    assert r.json()["state_version"] == 2
    assert "space-1" not in after and "space-2" not in after  # seen items excluded by default
    assert space_rank(after) < space_rank(before)  # the liked items' neighbours rose
    assert topic[after[0]] == "space"
    assert r.json()["items"][0]["reason"].startswith("because you")
    incl = _ids(app.call("GET", "/recommend", params={"user_id": uid, "k": n, "exclude_seen": "false"}))
    assert {"space-1", "space-2"} <= set(incl)
    summary = app.call("GET", "/users/alice").json()
    assert summary["version"] == 2 and [h["item_id"] for h in summary["history"]] == ["space-1", "space-2"]


def test_retried_body_counts_once_and_the_reply_names_the_ids(app: App) -> None:
    """The same body POSTed twice (a retry after a lost reply) used to count twice (n_events 2)."""
    body = {"user_id": "retry-user", "item_id": "cook-1", "event": "click", "ts": 1_700_000_000}
    first = app.call("POST", "/feedback", json=body).json()
    again = app.call("POST", "/feedback", json=body).json()
    assert first["duplicates"] == 0 and again["duplicates"] == 1
    assert again["event_ids"] == first["event_ids"] and len(first["event_ids"][0]) == 32
    assert app.call("GET", "/users/retry-user").json()["n_events"] == 1
    view = {"user_id": "retry-user", "item_id": "cook-2", "event": "view"}
    no_ts = app.call("POST", "/feedback", json=view)
    eid = no_ts.json()["event_ids"][0]
    retry = app.call("POST", "/feedback", json={"user_id": "retry-user", "item_id": "cook-2", "event": "view",
                                                "event_id": eid})
    assert retry.json()["duplicates"] == 1 and app.call("GET", "/users/retry-user").json()["n_events"] == 2


def test_dislike_sinks_item_and_near_duplicate(app: App) -> None:
    uid = "bob"
    app.call("POST", "/feedback", json={"user_id": uid, "item_id": "space-3", "event": "like"})
    before = _ids(app.call("GET", "/recommend", params={"user_id": uid, "k": 19}))
    assert before.index("space-0-dup") < 10
    r = app.call("POST", "/feedback", json={"user_id": uid, "item_id": "space-0", "event": "dislike"})
    assert r.status_code == 200 and r.json()["state_version"] == 2
    resp = app.call("GET", "/recommend", params={"user_id": uid, "k": 19})
    after = _ids(resp)
    assert "space-0" not in after  # disliked = seen = excluded
    assert after[-1] == "space-0-dup"  # its near-duplicate sank to the bottom
    assert "disliked" in resp.json()["items"][-1]["reason"]


def test_query_and_text_feedback(app: App) -> None:
    r = app.call("GET", "/recommend", params={"user_id": "carol", "k": 3, "q": TOPICS["horror"]})
    assert r.status_code == 200
    top = r.json()["items"][0]
    assert app.info["topic"][top["item_id"]] == "horror" and top["reason"].startswith("matches your query")
    fb = app.call("POST", "/feedback", json={"user_id": "dave", "event": "like", "text": TOPICS["cook"]})
    assert fb.status_code == 200, fb.text
    s = app.call("GET", "/users/dave").json()
    assert s["text_feedback"][0]["has_vec"] and s["has_vector"]
    assert "vec" not in s["text_feedback"][0]  # the text vector stays server-side (the ranker gets it)
    # the public body keeps its keys in their order (test_user_state.USERS_BODY: as before StateSummary)
    want = json.loads(USERS_BODY)
    assert list(s) == list(want) and list(s["text_feedback"][0]) == list(want["text_feedback"][0])
    hist = app.call("GET", "/users/p1").json()  # a user of the run's interactions (the shards' base)
    assert list(hist) == list(want) and list(hist["history"][0]) == list(want["history"][0])
    ids = _ids(app.call("GET", "/recommend", params={"user_id": "dave", "k": 3}))
    assert all(app.info["topic"][i] == "cook" for i in ids)


def test_delete_forgets_state_and_log(app: App) -> None:
    from llmrec.state.event_log import read_events

    uid = "erin"
    app.call("POST", "/feedback", json={"user_id": uid, "item_id": "horror-2", "event": "like"})
    assert (read_events(app.run / schema.RUN_EVENTS)[schema.USER_ID] == uid).sum() == 1
    d = app.call("DELETE", f"/users/{uid}")
    assert d.status_code == 200 and d.json() == {"ok": True, "deleted": True}
    assert app.call("GET", f"/users/{uid}").status_code == 404
    deadline = time.monotonic() + 30  # the shard purges its log in the background, about a second later
    events = app.run / schema.RUN_EVENTS
    while (read_events(events)[schema.USER_ID] == uid).sum() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert (read_events(app.run / schema.RUN_EVENTS)[schema.USER_ID] == uid).sum() == 0
    fresh = app.call("GET", "/recommend", params={"user_id": uid, "k": 5}).json()
    assert fresh["state_version"] == 0 and fresh["items"][0]["item_id"] == "cook-3"


def test_redeploy_swaps_model_version_without_errors(app: App) -> None:
    from ray import serve

    from llmrec.serve.app import build_app

    old = app.call("GET", "/healthz").json()["model_version"]
    assert app.call("POST", "/feedback", json={"user_id": "frank", "item_id": "cook-1", "event": "like"}).ok
    errors: list[str] = []
    stop = threading.Event()

    n_ok: list[int] = []

    def hammer() -> None:
        s = requests.Session()
        while not stop.is_set():
            try:  # a connection error must be counted, not kill the thread and leave `errors` empty
                r = s.get(app.url + "/recommend", params={"user_id": "frank", "k": 5}, timeout=60)
            except requests.RequestException as e:
                errors.append(f"{type(e).__name__}: {e}")
                continue
            if r.status_code != 200:
                errors.append(f"{r.status_code} {r.text[:100]}")
            else:
                n_ok.append(1)

    t = threading.Thread(target=hammer)
    t.start()
    try:
        cfg = {**app.user_config, "model_version": "v2-test"}
        serve.run(build_app({**app.args, "user_config": cfg}), name=app.name, route_prefix=f"/{app.name}")
        deadline = time.time() + 60
        while app.call("GET", "/healthz").json()["model_version"] != "v2-test" and time.time() < deadline:
            time.sleep(0.2)
    finally:
        stop.set()
        t.join()
    assert old != "v2-test"
    assert (
        app.call("GET", "/recommend", params={"user_id": "frank", "k": 2}).json()["model_version"]
        == "v2-test"
    )
    assert errors == []
    assert t.is_alive() is False and len(n_ok) >= 5  # the load really ran through the swap
    # user state survived the swap (the shards are detached actors, independent of the replicas)
    assert app.call("GET", "/users/frank").json()["version"] == 1


def test_redeploy_with_another_data_dir_swaps_the_run_users(
    app: App, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """user_config.data_dir names a newer run's data: every shard reloads its users from it; live users
    stay."""
    from ray import serve

    from llmrec.data.tables import write_interactions
    from llmrec.serve.app import build_app

    newer = tmp_path_factory.mktemp("newer-run-data")
    write_interactions(
        pd.DataFrame(
            {
                schema.USER_ID: ["p1", "n1"],
                schema.ITEM_ID: ["space-4", "cook-1"],
                schema.TS: np.array([10, 11], np.int64),
                schema.RATING: [np.nan, np.nan],
                schema.EVENT: ["like", "click"],
            }
        ),
        newer,
    )
    assert app.call("POST", "/feedback", json={"user_id": "gina", "item_id": "cook-2", "event": "like"}).ok
    assert app.call("GET", "/users/p3").status_code == 200
    cfg = {**app.user_config, "data_dir": str(newer)}
    serve.run(build_app({**app.args, "user_config": cfg}), name=app.name, route_prefix=f"/{app.name}")
    assert app.call("GET", "/users/n1").json()["history"][0]["item_id"] == "cook-1"
    assert [h["item_id"] for h in app.call("GET", "/users/p1").json()["history"]] == ["space-4"]
    assert app.call("GET", "/users/p3").status_code == 404  # only in the older run
    assert app.call("GET", "/users/gina").json()["n_events"] == 1  # live feedback survives the swap


def test_deployments_are_healthy_and_a_recommender_without_model_fails_its_probe(app: App) -> None:
    """The default app is one deployment, the Ingress, with the model in its process (test_listen serves
    the split one); Serve calls its check_health, which runs the model's probe: a search on its index."""
    from ray import serve

    from llmrec.serve.recommender import ModelClient, Recommender

    status = serve.status().applications[app.name]
    assert {name: d.status == "HEALTHY" for name, d in status.deployments.items()} == {"Ingress": True}
    rec = Recommender.func_or_class(str(app.run), None, "cpu")  # the deployment's class, in this process
    client = ModelClient(local=rec)  # what the Ingress holds and its check_health calls
    assert rec.check_health() is None and client.check_health() is None  # one top-1 search on the index
    rec._state = None  # as before its model loads (or after a failed swap)
    with pytest.raises(RuntimeError, match="no model loaded"):
        client.check_health()
    with pytest.raises(ValueError, match="exactly one of local"):
        ModelClient()
