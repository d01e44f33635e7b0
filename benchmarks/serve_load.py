"""Bounded HTTP load test of the llmrec Serve app on 127.0.0.1 (synthetic catalogs of random unit vectors).

For each catalog size: build a run folder (random 384-d unit vectors, ItemIndex kind "auto": flat at 10k,
HNSW at 100k), start the app on a free loopback port, give `--users` users 20 liked items each, then measure
(client-side wall time per request, keep-alive sessions):
  - POST /feedback (one event) and GET /recommend (k=10) latency, 1 client and `--clients` concurrent clients;
  - feedback->visible: POST a like, then GET /recommend until it reports the new state_version (read-your-
    writes means one GET; the figure is the POST+GET pair);
  - sustained events/s: `--clients` clients posting single events, and batches of 50, for `--seconds` s.
Writes a JSON report (`--out`) and prints a table. Everything runs on this machine: the load generator,
proxy, replicas and shard actors share its cores, so the figures are a lower bound for a real deployment.

    python benchmarks/serve_load.py --sizes 10000 100000 --out benchmarks/results/serve_load.json
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
            with tempfile.TemporaryDirectory(prefix=f"llmrec-load-{n}-") as tmp:
                report["results"].append(_bench_size(n, args, Path(tmp), port))
            _print(report["results"][-1])
    finally:
        serve.shutdown()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        logger.info("wrote %s", args.out)
    return 0


def _bench_size(n: int, args: argparse.Namespace, tmp: Path, port: int) -> dict[str, Any]:
    import requests
    from ray import serve

    from llmrec.serve.app import build_app
    from llmrec.state.store import StateStore

    t0 = time.perf_counter()
    ids = _make_run(tmp / "run", n, args.dim)
    build_s = time.perf_counter() - t0
    core_ms = _core_latency(tmp / "run", ids, args.requests)
    name = f"load{n}"
    state_name = f"load-state-{uuid.uuid4().hex[:6]}"
    t0 = time.perf_counter()
    serve.run(
        build_app({"run_dir": str(tmp / "run"), "n_shards": args.shards, "state_name": state_name}),
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
    print(f"\n== {res['n_items']} items (index build {res['build_s']} s, app start {res['app_start_s']} s)")
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
