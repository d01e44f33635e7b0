"""State shards over a run's users: start time, memory and `get` latency, against one `UserState` per user.

For each dataset a `StateStore` with `--shards` Ray actors starts over the run's prepared interactions
(`base_dir` = RUN/data): every shard streams the parquet file itself and keeps the last `--history-len` events
of its own users as numpy arrays (`llmrec.state.base`). Measured per dataset:
  - ours: store start wall (all shards loading in parallel), per-shard load seconds, bytes of the base arrays
    (exact `nbytes`) and the shard processes' RSS growth over the load (`rss_delta_bytes`, summed);
  - baseline "one materialised UserState per user" (what the shards would hold if every user were built as a
    `UserState`, as a feedback replay would): `apply_event` folded over the events of a random subsample of
    `--baseline-users` users, bytes by tracemalloc and build seconds, scaled by bytes (seconds) per event to
    all users; the ratio is baseline / ours;
  - hot swap: `set_base` to another path of the same file while a thread keeps calling `get` (wall, each
    shard's commit pause, get latency meanwhile);
  - `get` latency of a base-only user: through the store (Ray call, includes the transient state + summary +
    user vector when the run has embeddings) and in-process on one shard, next to `get` of the same users
    materialised (the baseline's path).
Datasets: movielens (RUN/data of movielens-latest-small), magazine (amazon-magazine-subscriptions-2018) and
synthetic: `--synthetic-users` users x `--synthetic-events` events (random user order, Zipf(1.0) items over
`--synthetic-items` ids, increasing ts), generated here with numpy into a temporary parquet file.

    python benchmarks/state_load.py --out runs/bench/state_load.json
    python benchmarks/state_load.py --datasets synthetic --synthetic-users 200000   # a loaded machine
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
import tracemalloc
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from llmrec.artifacts import write_json_report

logger = logging.getLogger("state_load")

RUNS = Path(__file__).resolve().parents[1] / "runs"
REAL = {
    "movielens": "movielens-latest-small",
    "magazine": "amazon-magazine-subscriptions-2018",
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=["movielens", "magazine", "synthetic"],
                   choices=["movielens", "magazine", "synthetic"])
    p.add_argument("--runs", default=str(RUNS), help="folder holding the prepared runs (RUNS/<dataset>/data)")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--history-len", type=int, default=200)
    p.add_argument("--baseline-users", type=int, default=5000, help="users in the materialised baseline")
    p.add_argument("--get-users", type=int, default=300, help="users whose get latency is measured")
    p.add_argument("--synthetic-users", type=int, default=1_000_000)
    p.add_argument("--synthetic-events", type=int, default=20, help="events per synthetic user")
    p.add_argument("--synthetic-items", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON report path")
    args = p.parse_args(argv)

    from llmrec.log import setup_logging
    from llmrec.raysetup import init_ray, local_env_defaults, ray_detail_to_log_files

    local_env_defaults()
    ray_detail_to_log_files()  # Ray Data's progress dumps to the session's log files
    setup_logging("INFO")
    init_ray(dashboard=False)
    report: dict[str, Any] = {"machine": _machine(), "args": vars(args), "loadavg_start": os.getloadavg(),
                              "results": []}
    for name in args.datasets:
        with tempfile.TemporaryDirectory(prefix=f"llmrec-state-{name}-") as tmp:
            if name == "synthetic":
                data = Path(tmp) / "data"
                t0 = time.perf_counter()
                n_rows = write_synthetic(data, args.synthetic_users, args.synthetic_events,
                                         args.synthetic_items, args.seed)
                logger.info("synthetic: wrote %d rows in %.1fs", n_rows, time.perf_counter() - t0)
                emb = None
            else:
                run = Path(args.runs) / REAL[name]
                data = run / "data"
                emb = run / "embeddings" if (run / "embeddings" / "meta.json").is_file() else None
                if not (data / "interactions.parquet").is_file():
                    why = (f"{data}/interactions.parquet not found: run `make run DATASET={REAL[name]}` or "
                           "pass --runs")
                    logger.warning("%s skipped: %s", name, why)
                    report["results"].append({"dataset": name, "skipped": why})
                    continue
            res = bench_dataset(name, data, emb, Path(tmp), args)
        report["results"].append(res)
        _print(res)
    report["loadavg_end"] = os.getloadavg()
    write_json_report(report, args.out, echo=True)
    if args.out:
        logger.info("wrote %s", args.out)
    import ray

    ray.shutdown()
    return 0


def write_synthetic(out: Path, n_users: int, per_user: int, n_items: int, seed: int) -> int:
    """interactions.parquet: each user has `per_user` events, users in random order, Zipf items, rising ts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from llmrec.schema import EVENT, EVENT_KINDS, INTERACTIONS_FILE, ITEM_ID, RATING, TS, USER_ID

    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    users = pa.array([f"u{k:07d}" for k in range(n_users)])
    items = pa.array([f"item{k:06d}" for k in range(n_items)])
    p_item = 1.0 / np.arange(1, n_items + 1)
    cdf = np.cumsum(p_item / p_item.sum())
    kinds = pa.array(list(EVENT_KINDS))
    # view, click, like, dislike, skip, purchase, rating (schema.EVENT_KINDS order)
    p_kind = np.array([0.40, 0.25, 0.12, 0.03, 0.03, 0.05, 0.12])
    order = np.repeat(np.arange(n_users, dtype=np.int32), per_user)
    rng.shuffle(order)
    n = len(order)
    chunk = 2_000_000
    schema = pa.schema([(USER_ID, pa.string()), (ITEM_ID, pa.string()), (TS, pa.int64()),
                        (RATING, pa.float64()), (EVENT, pa.string())])
    with pq.ParquetWriter(out / INTERACTIONS_FILE, schema) as w:
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            m = hi - lo
            item_idx = np.minimum(np.searchsorted(cdf, rng.random(m)), n_items - 1).astype(np.int32)
            kind_idx = rng.choice(len(p_kind), size=m, p=p_kind).astype(np.int32)
            rating = np.where(kind_idx == EVENT_KINDS.index("rating"), rng.integers(1, 6, m), np.nan)
            w.write_table(pa.table({
                USER_ID: pa.DictionaryArray.from_arrays(pa.array(order[lo:hi]), users).dictionary_decode(),
                ITEM_ID: pa.DictionaryArray.from_arrays(pa.array(item_idx), items).dictionary_decode(),
                TS: pa.array(1_600_000_000 + np.arange(lo, hi, dtype=np.int64)),
                RATING: pa.array(rating, pa.float64()),
                EVENT: pa.DictionaryArray.from_arrays(pa.array(kind_idx), kinds).dictionary_decode(),
            }, schema=schema))
    (out / "meta.json").write_text(json.dumps({"stage": "prepare", "fingerprint": f"synthetic-{seed}-{n}"}))
    return n


def bench_dataset(name: str, data: Path, emb: Path | None, tmp: Path, args: argparse.Namespace
                  ) -> dict[str, Any]:
    import pyarrow.parquet as pq

    from llmrec.state.store import EmbeddingsMeanVectorizer, StateStore, UserStateShard

    meta = pq.ParquetFile(data / "interactions.parquet").metadata
    factory = EmbeddingsMeanVectorizer(str(emb)) if emb is not None else None
    res: dict[str, Any] = {"dataset": name, "data_dir": str(data), "n_rows": meta.num_rows,
                           "file_bytes": (data / "interactions.parquet").stat().st_size,
                           "vectors": emb is not None, "shards": args.shards,
                           "loadavg_before": os.getloadavg()}

    # ---- ours: the Ray store, every shard loading its users in parallel
    t0 = time.perf_counter()
    store = StateStore(n_shards=args.shards, log_dir=tmp / "events", namespace="llmrec-bench",
                       name=f"bench-{uuid.uuid4().hex[:6]}", vectorizer_factory=factory,
                       history_len=args.history_len, base_dir=data)
    res["store_start_s"] = round(time.perf_counter() - t0, 3)
    try:
        stats = store.stats_sync()
        bases = [s["base"] for s in stats["shards"]]
        res["n_users"] = stats["n_users"]
        res["n_events"] = stats["n_events"]
        res["ours"] = {
            "load_s_per_shard": [b["load_s"] for b in bases],
            "base_nbytes": sum(b["nbytes"] for b in bases),
            "rss_delta_bytes": sum(b["rss_delta_bytes"] for b in bases),
            "rss_peak_bytes_per_shard": [b["rss_peak_bytes"] for b in bases],
            "n_events_kept": sum(b["n_events_kept"] for b in bases),
        }
        res["ours"]["base_bytes_per_user"] = round(res["ours"]["base_nbytes"] / res["n_users"], 1)
        res["ours"]["rss_bytes_per_user"] = round(res["ours"]["rss_delta_bytes"] / res["n_users"], 1)
        users = _all_users(data)
        rng = np.random.default_rng(args.seed)
        pick = rng.choice(len(users), size=min(args.get_users, len(users)), replace=False)
        probe = [users[i] for i in pick]
        res["get_store_ms"] = _timed(lambda u: store.get_sync(u), probe)
        res["hot_swap"] = _hot_swap(store, data, tmp, probe)
    finally:
        store.shutdown(kill_all=True)

    # ---- in-process: one shard, get of base-only users vs the same users materialised
    t0 = time.perf_counter()
    shard = UserStateShard(0, str(tmp / "events-local"), factory, history_len=args.history_len,
                           n_shards=args.shards, base_dir=str(data))
    # shard 0 alone (no other process competing for the cores): its load seconds and array bytes
    res["one_shard_in_process"] = {"start_s": round(time.perf_counter() - t0, 3),
                                   "load_s": shard.base_info["load_s"], "nbytes": shard.base_info["nbytes"]}
    mine = [u for u in probe if shard.base.row(u) is not None] or probe[:0]
    res["get_base_only_ms"] = _timed(shard.get, mine)
    base_gets = {u: shard.get(u) for u in mine}
    for u in mine:  # materialise them exactly as feedback would (overlay on the base history)
        shard.users[u] = shard.base.state(shard.base.row(u), history_len=args.history_len)
        shard._refresh_vector(u)
    res["get_materialised_ms"] = _timed(shard.get, mine)
    assert all(shard.get(u) == base_gets[u] for u in mine), "materialised get differs from the base-only get"
    shard.close()
    del shard

    # ---- baseline: one UserState per user, built by folding apply_event over each user's events
    res["baseline"] = _baseline(data, users, args)
    b, o = res["baseline"], res["ours"]
    b["bytes_all_users_est"] = int(b["bytes_per_user"] * res["n_users"])
    res["ratio_memory_baseline_over_ours"] = {
        "vs_base_nbytes": round(b["bytes_all_users_est"] / o["base_nbytes"], 1),
        "vs_rss_delta": round(b["bytes_all_users_est"] / max(o["rss_delta_bytes"], 1), 1),
    }
    res["ratio_load_baseline_over_ours"] = {
        "vs_sum_of_shard_loads": round(b["build_s_all_users_est"] / sum(o["load_s_per_shard"]), 2),
        "vs_slowest_shard": round(b["build_s_all_users_est"] / max(o["load_s_per_shard"]), 2),
    }
    res["loadavg_after"] = os.getloadavg()
    return res


def _hot_swap(store: Any, data: Path, tmp: Path, probe: list[str]) -> dict[str, Any]:
    """`set_base` to a link of the same file (another path: a new base) while a thread keeps calling `get`."""
    import threading

    other = tmp / "data-swap"
    other.mkdir()
    os.link(data / "interactions.parquet", other / "interactions.parquet")
    ms: list[float] = []
    stop = threading.Event()

    def reader() -> None:
        k = 0
        while not stop.is_set():
            t0 = time.perf_counter()
            store.get_sync(probe[k % len(probe)])
            ms.append((time.perf_counter() - t0) * 1e3)
            k += 1

    th = threading.Thread(target=reader)
    th.start()
    t0 = time.perf_counter()
    out = store.set_base_sync(other)
    wall = time.perf_counter() - t0
    stop.set()
    th.join()
    ms.sort()
    return {"wall_s": round(wall, 3), "commit_s_per_shard": [round(o["commit_s"], 3) for o in out],
            "gets_during_swap": len(ms), "get_p50_ms": round(statistics.median(ms), 3) if ms else None,
            "get_max_ms": round(ms[-1], 1) if ms else None}


def _baseline(data: Path, users: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """tracemalloc bytes and build seconds of `UserState`s for a random subsample, per user and scaled."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from llmrec.schema import EVENT, ITEM_ID, RATING, TS, USER_ID
    from llmrec.state.user_state import Event, UserState, apply_event

    rng = np.random.default_rng(args.seed + 1)
    sub = [users[i] for i in rng.choice(len(users), size=min(args.baseline_users, len(users)), replace=False)]
    t = pq.read_table(data / "interactions.parquet", columns=[USER_ID, ITEM_ID, TS, RATING, EVENT])
    t = t.filter(pc.is_in(t.column(USER_ID), value_set=pa.array(sub)))
    df = t.to_pandas()
    df["_pos"] = np.arange(len(df))
    df = df.sort_values([USER_ID, TS, "_pos"], kind="stable")
    rows = list(df[[USER_ID, ITEM_ID, EVENT, RATING, TS]].itertuples(index=False, name=None))

    def build() -> dict[str, UserState]:
        states: dict[str, UserState] = {}
        for uid, item, kind, rating, ts in rows:
            st = states.get(uid) or UserState(user_id=uid, history_len=args.history_len)
            value = None if rating != rating else float(rating)
            states[uid] = apply_event(st, Event(user_id=uid, item_id=item, event=kind, value=value,
                                                ts=float(ts)))
        return states

    t0 = time.perf_counter()
    build()  # timed without tracemalloc (it slows allocation down several times)
    build_s = time.perf_counter() - t0
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    states = build()
    nbytes = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    n_sub_events = len(rows)
    return {"users": len(states), "events": n_sub_events, "bytes": int(nbytes),
            "bytes_per_user": round(nbytes / len(states), 1),
            "build_s": round(build_s, 3), "build_s_per_event_us": round(1e6 * build_s / n_sub_events, 2),
            "build_s_all_users_est": round(build_s / len(states) * len(users), 2)}


def _all_users(data: Path) -> list[str]:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    col = pq.read_table(data / "interactions.parquet", columns=["user_id"]).column("user_id")
    return pc.unique(col).to_pylist()


def _timed(fn: Any, users: list[str]) -> dict[str, Any]:
    if not users:
        return {"n": 0}
    fn(users[0])  # warm-up
    ms = []
    for u in users:
        t0 = time.perf_counter()
        fn(u)
        ms.append((time.perf_counter() - t0) * 1e3)
    ms.sort()
    return {"n": len(ms), "p50_ms": round(statistics.median(ms), 3),
            "p99_ms": round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 3),
            "mean_ms": round(statistics.fmean(ms), 3)}


def _machine() -> dict[str, Any]:
    import platform

    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}


def _print(r: dict[str, Any]) -> None:
    o, b = r["ours"], r["baseline"]
    print(f"\n== {r['dataset']}: {r['n_users']:,} users, {r['n_rows']:,} rows, {r['shards']} shards")
    print(f"  store start {r['store_start_s']} s (shard loads {o['load_s_per_shard']} s); baseline est. "
          f"{b['build_s_all_users_est']} s: x{r['ratio_load_baseline_over_ours']}")
    print(f"  memory: base arrays {o['base_nbytes'] / 1e6:.1f} MB ({o['base_bytes_per_user']} B/user), "
          f"RSS +{o['rss_delta_bytes'] / 1e6:.1f} MB; baseline est. {b['bytes_all_users_est'] / 1e6:.1f} MB "
          f"({b['bytes_per_user']} B/user): x{r['ratio_memory_baseline_over_ours']}")
    hs = r["hot_swap"]
    print(f"  hot swap {hs['wall_s']} s (commit pause per shard {hs['commit_s_per_shard']} s); "
          f"{hs['gets_during_swap']} gets meanwhile: p50 {hs['get_p50_ms']} ms, max {hs['get_max_ms']} ms")
    print(f"  get base-only: store p50 {r['get_store_ms'].get('p50_ms')} ms, in-process p50 "
          f"{r['get_base_only_ms'].get('p50_ms')} ms vs materialised "
          f"{r['get_materialised_ms'].get('p50_ms')} ms")


if __name__ == "__main__":
    raise SystemExit(main())
