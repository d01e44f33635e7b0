"""Bounded HTTP load test of the llmrec Serve app on 127.0.0.1 (synthetic catalogs of random unit vectors).

For each catalog size and each `--topologies` entry (`in_ingress`: the default app, the model inside each
Ingress replica; `split`: `build_app(split_model=True)`, the model in a Recommender deployment behind a
handle, the app's only topology before 2026-12-02 and the baseline of the ratios): build a run folder (random
384-d unit vectors, ItemIndex kind "auto": flat at 10k, HNSW at 100k), start the app on a free loopback port,
give `--users` users 20 liked items each, then measure (client-side wall time per request, keep-alive
sessions):
  - POST /feedback (one event) and GET /recommend (k=10) latency, 1 client and `--clients` concurrent clients;
  - feedback->visible: POST a like, then GET /recommend until it reports the new state_version (read-your-
    writes means one GET; the figure is the POST+GET pair);
  - sustained events/s: `--clients` clients posting single events, and batches of 50, for `--seconds` s.
Then the floor of the platform (`--floor`, on by default): the same hops with no work in them (Serve's
HTTP proxy -> a FastAPI deployment -> one actor call, a fixed 10-item answer), GET at 1 and `--clients`
clients: no llmrec app on this machine can beat it. Writes a JSON report (`--out`) and prints a table.
Everything runs on this machine: the load generator, proxy, replicas and shard actors share its cores, so
the figures are a lower bound for a real deployment.

    python benchmarks/serve_load.py --sizes 10000 --clients 16 --out runs/bench/serve_load.json
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from llmrec.artifacts import write_json_report

logger = logging.getLogger("serve_load")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000], help="catalog sizes")
    p.add_argument("--dim", type=int, default=384, help="vector dim (384 = the MiniLM encoder's)")
    p.add_argument("--requests", type=int, default=300, help="requests per latency phase per client")
    p.add_argument("--clients", type=int, default=4, help="concurrent clients for the concurrent phases")
    p.add_argument("--users", type=int, default=200, help="users with a history")
    p.add_argument("--seconds", type=float, default=10.0, help="duration of each sustained-throughput phase")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--topologies", nargs="+", default=["in_ingress", "split"],
                   choices=["in_ingress", "split"], help="where the model runs (see the module docstring)")
    p.add_argument("--no-floor", dest="floor", action="store_false", help="skip the no-work app")
    p.add_argument("--out", default=None, help="JSON report path")
    args = p.parse_args(argv)

    from llmrec.log import setup_logging
    from llmrec.raysetup import init_ray, local_env_defaults, ray_detail_to_log_files

    local_env_defaults()
    ray_detail_to_log_files()  # Ray Data's progress dumps to the session's log files
    setup_logging("INFO")
    init_ray()
    report: dict[str, Any] = {"machine": _machine(), "args": vars(args), "results": []}
    from ray import serve
    from ray.serve.schema import LoggingConfig

    port = _free_port()
    serve.start(
        http_options={"host": "127.0.0.1", "port": port},
        logging_config=LoggingConfig(enable_access_log=False),
    )
    try:
        for n in args.sizes:
            for topology in args.topologies:
                with tempfile.TemporaryDirectory(prefix=f"llmrec-load-{n}-") as tmp:
                    report["results"].append(_bench_size(n, args, Path(tmp), port, topology))
                _print(report["results"][-1])
            _ratios(report["results"], n, args.clients)
        if args.floor:
            report["floor"] = _floor(args, port)
            print("\n== floor (proxy -> FastAPI -> an actor call, no work):", json.dumps(report["floor"]))
    finally:
        serve.shutdown()
    if args.out:
        write_json_report(report, args.out)
        logger.info("wrote %s", args.out)
    return 0


def _ratios(results: list[dict[str, Any]], n: int, clients: int) -> None:
    """in_ingress / split throughput and p99 of GET /recommend, into the in_ingress result (both measured)."""
    by = {r["topology"]: r for r in results if r["n_items"] == n}
    if {"in_ingress", "split"} <= set(by):
        new, old = by["in_ingress"], by["split"]
        for c in (1, clients):
            key = f"recommend_{c}client" + ("s" if c > 1 else "")
            new[f"{key}_vs_split"] = {
                "req_per_s_ratio": round(new[key]["req_per_s"] / old[key]["req_per_s"], 2),
                "p99_ratio": round(new[key]["p99_ms"] / old[key]["p99_ms"], 2),
            }
            print(f"  in_ingress / split, {key}: {new[f'{key}_vs_split']}")


def _floor(args: argparse.Namespace, port: int) -> dict[str, Any]:
    """The no-work app of the same hops (module docstring): GET latency at 1 and `--clients` clients."""
    import ray
    import requests
    from fastapi import FastAPI
    from ray import serve

    api = FastAPI()

    @ray.remote(num_cpus=0)
    class Nothing:
        def get(self, user_id: str) -> dict[str, Any]:
            return {"user_id": user_id}

    @serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=200)
    @serve.ingress(api)
    class Floor:
        def __init__(self) -> None:
            self.actor = Nothing.remote()

        @api.get("/recommend")
        async def recommend(self, user_id: str) -> dict[str, Any]:
            state = await self.actor.get.remote(user_id)
            return {"user_id": state["user_id"], "items": [{"item_id": str(i)} for i in range(10)]}

    serve.run(Floor.bind(), name="floor", route_prefix="/floor", logging_config={"enable_access_log": False})
    url = f"http://127.0.0.1:{port}/floor/recommend"

    def get(s: Any, r: np.random.Generator) -> None:
        resp = s.get(url, params={"user_id": f"user{int(r.integers(100))}"}, timeout=60)
        assert resp.status_code == 200, resp.text

    warm, rng = requests.Session(), np.random.default_rng(0)
    for _ in range(20):
        get(warm, rng)
    out = {"get_1client": _latency(get, 1, args.requests),
           f"get_{args.clients}clients": _latency(get, args.clients, args.requests // 2)}
    serve.delete("floor")
    return out


def _bench_size(n: int, args: argparse.Namespace, tmp: Path, port: int, topology: str) -> dict[str, Any]:
    import requests
    from ray import serve

    from llmrec.serve.app import build_app
    from llmrec.state.store import StateStore

    t0 = time.perf_counter()
    ids = _make_run(tmp / "run", n, args.dim)
    build_s = time.perf_counter() - t0
    core_ms = _core_latency(tmp / "run", ids, args.requests)
    name = f"load{n}{topology}"
    state_name = f"load-state-{uuid.uuid4().hex[:6]}"
    t0 = time.perf_counter()
    serve.run(
        build_app({"run_dir": str(tmp / "run"), "n_shards": args.shards, "state_name": state_name,
                   "split_model": topology == "split"}),
        name=name,
        route_prefix=f"/{name}",
        logging_config={"enable_access_log": False},
    )
    start_s = time.perf_counter() - t0
    url = f"http://127.0.0.1:{port}/{name}"
    rng = np.random.default_rng(0)
    users = [f"user{u}" for u in range(args.users)]
    http = requests.Session()
    for i in range(0, len(users), 10):  # 20 liked items per user, posted in batches
        evs = [
            {"user_id": u, "item_id": str(ids[j]), "event": "like"}
            for u in users[i : i + 10]
            for j in rng.choice(n, 20, replace=False)
        ]
        r = http.post(f"{url}/feedback", json={"events": evs}, timeout=60)
        r.raise_for_status()
    for _ in range(20):  # warm-up
        http.get(f"{url}/recommend", params={"user_id": users[0], "k": 10}, timeout=60)
        http.post(
            f"{url}/feedback", json={"user_id": users[0], "item_id": str(ids[0]), "event": "view"}, timeout=60
        )

    def fb(s: Any, r: np.random.Generator) -> None:
        resp = s.post(
            f"{url}/feedback",
            json={
                "user_id": users[int(r.integers(len(users)))],
                "item_id": str(ids[int(r.integers(n))]),
                "event": "click",
            },
            timeout=60,
        )
        assert resp.status_code == 200, resp.text

    def rec(s: Any, r: np.random.Generator) -> None:
        resp = s.get(
            f"{url}/recommend", params={"user_id": users[int(r.integers(len(users)))], "k": 10}, timeout=60
        )
        assert resp.status_code == 200, resp.text

    def visible(s: Any, r: np.random.Generator) -> None:
        u = users[int(r.integers(len(users)))]
        v = s.post(
            f"{url}/feedback",
            json={"user_id": u, "item_id": str(ids[int(r.integers(n))]), "event": "like"},
            timeout=60,
        ).json()["state_version"]
        got = s.get(f"{url}/recommend", params={"user_id": u, "k": 10}, timeout=60).json()["state_version"]
        assert got >= v, f"read-your-writes violated: posted version {v}, recommend saw {got}"

    res: dict[str, Any] = {
        "n_items": n,
        "topology": topology,
        "build_s": round(build_s, 1),
        "app_start_s": round(start_s, 1),
        "core_recommend_in_process": core_ms,
    }
    for label, fn in (("feedback", fb), ("recommend", rec), ("feedback_to_visible", visible)):
        res[f"{label}_1client"] = _latency(fn, 1, args.requests)
        res[f"{label}_{args.clients}clients"] = _latency(fn, args.clients, args.requests // 2)
    res[f"events_per_s_single_{args.clients}clients"] = _throughput(
        url, users, ids, args.clients, args.seconds, 1
    )
    res[f"events_per_s_batch50_{args.clients}clients"] = _throughput(
        url, users, ids, args.clients, args.seconds, 50
    )
    serve.delete(name)
    StateStore(n_shards=args.shards, log_dir=tmp / "run" / "events", name=state_name).shutdown(kill_all=True)
    return res


def _core_latency(run: Path, ids: np.ndarray, n_calls: int) -> dict[str, float]:
    """The ranking alone, in-process (no HTTP, no actors): RecommendCore.recommend, 20-like user, k=10."""
    import faiss

    from llmrec import schema
    from llmrec.index.item_index import ItemIndex
    from llmrec.serve.recommend_core import RecommendCore, load_catalog
    from llmrec.serve.user_view import UserView
    from llmrec.state.user_state import Event, MeanVectorizer, UserState, apply_event

    faiss.omp_set_num_threads(1)  # as in a Serve replica (Ray sets OMP_NUM_THREADS=1 there)
    catalog, meta = load_catalog(run)
    core = RecommendCore(
        catalog, ItemIndex.load(run / schema.RUN_INDEX, expect_embed_meta=meta, device="cpu")
    )
    vec = MeanVectorizer(catalog.item_ids, catalog.vectors)
    rng = np.random.default_rng(1)
    lat = []
    for c in range(n_calls):
        st = UserState(user_id="u")
        for j in rng.choice(len(ids), 20, replace=False):
            st = apply_event(st, Event(user_id="u", item_id=str(ids[j]), event="like", ts=float(c)))
        view = UserView.from_state(st)
        t = time.perf_counter()
        view.vector = vec(st)
        core.recommend([view], k=10)
        lat.append((time.perf_counter() - t) * 1e3)
    a = np.array(lat)
    return {
        "n": len(a),
        "p50_ms": round(float(np.percentile(a, 50)), 2),
        "p99_ms": round(float(np.percentile(a, 99)), 2),
        "mean_ms": round(float(a.mean()), 2),
        "req_per_s": round(1e3 / float(a.mean()), 1),
    }


def _latency(fn: Any, clients: int, per_client: int) -> dict[str, float]:
    import requests

    lat: list[float] = []
    lock = threading.Lock()

    def worker(seed: int) -> None:
        s, r, mine = requests.Session(), np.random.default_rng(seed), []
        for _ in range(per_client):
            t = time.perf_counter()
            fn(s, r)
            mine.append((time.perf_counter() - t) * 1e3)
        with lock:
            lat.extend(mine)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    a = np.array(lat)
    return {
        "n": len(a),
        "p50_ms": round(float(np.percentile(a, 50)), 1),
        "p99_ms": round(float(np.percentile(a, 99)), 1),
        "mean_ms": round(float(a.mean()), 1),
        "req_per_s": round(len(a) / wall, 1),
    }


def _throughput(
    url: str, users: list[str], ids: np.ndarray, clients: int, seconds: float, batch: int
) -> float:
    import requests

    counts = [0] * clients
    stop = time.perf_counter() + seconds

    def worker(i: int) -> None:
        s, r = requests.Session(), np.random.default_rng(100 + i)
        while time.perf_counter() < stop:
            evs = [
                {
                    "user_id": users[int(r.integers(len(users)))],
                    "item_id": str(ids[int(r.integers(len(ids)))]),
                    "event": "view",
                }
                for _ in range(batch)
            ]
            resp = s.post(f"{url}/feedback", json={"events": evs} if batch > 1 else evs[0], timeout=60)
            assert resp.status_code == 200, resp.text
            counts[i] += batch

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return round(sum(counts) / (time.perf_counter() - t0), 1)


def _make_run(run: Path, n: int, dim: int) -> np.ndarray:
    """RUN/embeddings (random unit vectors, recorded as the default MiniLM so q/text encode) + RUN/index."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from llmrec import schema
    from llmrec.artifacts import write_meta
    from llmrec.embed.encoder import DEFAULT_MODEL_NAME, default_model_path
    from llmrec.index.item_index import ItemIndex

    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = np.array([f"item{i}" for i in range(n)], dtype=object)
    emb = run / schema.RUN_EMBEDDINGS
    emb.mkdir(parents=True)
    col = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1), pa.float32()), dim)
    pq.write_table(
        pa.table({schema.ITEM_ID: pa.array(list(ids), pa.string()), schema.EMBEDDING: col}),
        emb / schema.EMBEDDINGS_FILE,
    )
    meta = write_meta(
        emb,
        "embed",
        model_name=DEFAULT_MODEL_NAME,
        model_path=default_model_path(),
        dim=dim,
        normalized=True,
        max_length=128,
        pooling="mean",
        n_items=n,
    )
    t0 = time.perf_counter()
    idx = ItemIndex.build(x, list(ids), kind="auto", device="cpu", embed_meta=meta)
    idx.save(run / schema.RUN_INDEX, meta)
    logger.info("synthetic run: %d x %d, %s index built in %.1fs", n, dim, idx.kind, time.perf_counter() - t0)
    return ids


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _machine() -> dict[str, Any]:
    import os
    import platform

    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}


def _print(res: dict[str, Any]) -> None:
    print(f"\n== {res['n_items']} items, model {res['topology']} (index build {res['build_s']} s, "
          f"app start {res['app_start_s']} s)")
    for k, v in res.items():
        if isinstance(v, dict):
            print(
                f"  {k:34s} p50 {v['p50_ms']:7.1f} ms  p99 {v['p99_ms']:7.1f} ms  {v['req_per_s']:7.1f} req/s"
            )
        elif k.startswith("events_per_s"):
            print(f"  {k:34s} {v:9.1f} events/s")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
