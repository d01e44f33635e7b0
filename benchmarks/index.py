"""Index benchmark: the `llmrec index` build path per kind and size, each kind in its own process.

For each size it writes (once, cached under --work) a seeded clustered synthetic embeddings artifact
(topics -> sub-topics -> items with per-item noise, unit rows; the recipe of tests/test_item_index.py) in
65,536-row row groups, plus held-out queries from the same distribution and their exact top-k. Then, per
kind, one child process runs `build_index` (the streaming build of `llmrec index`: wall time, peak RSS
(VmHWM) above the process's RSS after imports, index file size, the recall@10 it writes to meta.json), and
a second child loads the index and searches it: batched QPS, single-query p50 latency (plain, and with
`--exclude` random ids excluded per query through `ItemIndex.search(exclude=...)`), RSS of the loaded
index, recall@10 of the held-out queries against exact search. Ratios against flat come from the same run.

    .venv/bin/python benchmarks/index.py --sizes 10000 100000 --kinds flat hnsw ivf torch
    .venv/bin/python benchmarks/index.py --sizes 1000000 --kinds flat hnsw IVF4096,SQ8 IVF4096,PQ48 \
        --threads 1 --flat-queries 200 --json index-1m.json
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from llmrec.artifacts import write_json_report

logger = logging.getLogger(__name__)


def draw_items(topics_subs: np.ndarray, m: int, rng: np.random.Generator, noise: float = 1.3) -> np.ndarray:
    """m unit rows (m, d) float32 around random sub-topics with per-item noise."""
    d = topics_subs.shape[1]
    v = topics_subs[rng.integers(0, len(topics_subs), m)]
    v = v + noise * rng.uniform(0.5, 1.5, size=(m, 1)) * rng.normal(size=(m, d))
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def sub_topics(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    topics = rng.normal(size=(max(8, n // 500), d))
    n_sub = max(80, n // 50)
    return topics[rng.integers(0, len(topics), n_sub)] + 0.7 * rng.normal(size=(n_sub, d))


def write_dataset(work: Path, n: int, d: int, n_queries: int, k: int, seed: int = 0) -> Path:
    """Embeddings artifact + queries.npy + truth.npy under work/syn-{n}x{d}; reused when already there."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from llmrec.artifacts import write_meta
    from llmrec.index.backends import RunningTopK
    from llmrec.schema import EMBEDDING, EMBEDDINGS_FILE, ITEM_ID, META_FILE

    out = work / f"syn-{n}x{d}-s{seed}"
    emb = out / "embeddings"
    key = {"n": n, "d": d, "seed": seed, "queries": n_queries, "k": k}
    if (out / "key.json").is_file() and json.loads((out / "key.json").read_text()) == key:
        return out
    t0 = time.perf_counter()
    emb.mkdir(parents=True, exist_ok=True)
    (emb / META_FILE).unlink(missing_ok=True)
    subs = sub_topics(n, d, seed)
    queries = draw_items(subs, n_queries, np.random.default_rng(seed + 1))
    truth = RunningTopK(queries, k)
    schema = pa.schema([(ITEM_ID, pa.string()), (EMBEDDING, pa.list_(pa.float32(), d))])
    rows = 65_536
    with pq.ParquetWriter(emb / EMBEDDINGS_FILE, schema) as w:
        for c0 in range(0, n, rows):
            m = min(rows, n - c0)
            x = draw_items(subs, m, np.random.default_rng([seed, c0]))
            col = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1), pa.float32()), d)
            w.write_table(pa.table({ITEM_ID: pa.array([f"i{j}" for j in range(c0, c0 + m)]), EMBEDDING: col}))
            truth.update(x)
    write_meta(
        emb,
        "embed",
        model_name="synthetic-clustered",
        dim=d,
        n_items=n,
        normalized=True,
        dataset_fingerprint=f"synthetic-{n}x{d}-seed{seed}",
    )
    np.save(out / "queries.npy", queries)
    np.save(out / "truth.npy", truth.rows)
    (out / "key.json").write_text(json.dumps(key))
    print(
        f"wrote {n} x {d} synthetic embeddings + exact top-{k} in {time.perf_counter() - t0:.0f}s",
        file=sys.stderr,
    )
    return out


def _cpu_s() -> float:
    """user + system CPU seconds of this process so far (all threads): the work, whatever the load."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(job: dict) -> dict:
    """Run in a fresh process: 'build' (build_index) or 'search' (load + search) one kind."""
    import faiss
    import torch

    from llmrec.index.build import build_index
    from llmrec.index.item_index import ItemIndex, recall_at_k

    if job["threads"]:
        faiss.omp_set_num_threads(job["threads"])
        torch.set_num_threads(job["threads"])
    base = _rss_mib("VmRSS")
    data, out = Path(job["data"]), Path(job["out"])
    if job["mode"] == "build":
        t0, c0 = time.perf_counter(), _cpu_s()
        meta = build_index(
            data / "embeddings", out, kind=job["kind"], sample=job["recall_sample"], device=job["device"]
        )
        return {
            "build_s": round(time.perf_counter() - t0, 1),
            "build_cpu_s": round(_cpu_s() - c0, 1),
            "build_peak_rss_mib": round(_rss_mib("VmHWM") - base, 0),
            "base_rss_mib": round(base, 0),
            "index_mib": round(meta["index_bytes"] / 2**20, 1),
            "kind": meta["kind"],
            "factory": meta.get("factory"),
            "meta_recall_at_10": meta.get("recall_at_10"),
            "train_size": meta.get("train_size"),
            "train_s": meta.get("train_s"),
            "params": {p: v for p, v in meta["params"].items() if p in ("M", "ef_search", "nlist", "nprobe")},
        }
    t0 = time.perf_counter()
    idx = ItemIndex.load(out, device=job["device"])
    load_s = time.perf_counter() - t0
    rss_index = _rss_mib("VmRSS") - base
    q, truth = np.load(data / "queries.npy"), np.load(data / "truth.npy")
    k = truth.shape[1]
    nq, ns = job["batch_queries"], job["single_queries"]
    idx.search(q[:8], k)  # warm-up
    t0, c0 = time.perf_counter(), _cpu_s()
    _, got = idx.search(q[:nq], k)
    batch_s, batch_cpu = time.perf_counter() - t0, _cpu_s() - c0
    pos = np.array([[idx.position(i) if i else -1 for i in r] for r in got])
    rng = np.random.default_rng(7)
    lat, lat_ex, leaked, single_cpu, excl_cpu = [], [], 0, 0.0, 0.0
    for r in range(ns):
        t1, c1 = time.perf_counter(), _cpu_s()
        idx.search(q[r : r + 1], k)
        lat.append(time.perf_counter() - t1)
        single_cpu += _cpu_s() - c1
        if job["exclude"]:  # the true top-k plus random ids: exclusion must remove them all
            ex = list(idx.item_ids[truth[r]]) + list(
                idx.item_ids[rng.integers(0, idx.n_items, job["exclude"])]
            )
            t1, c1 = time.perf_counter(), _cpu_s()
            _, ids_ex = idx.search(q[r : r + 1], k, exclude=[ex])
            lat_ex.append(time.perf_counter() - t1)
            excl_cpu += _cpu_s() - c1
            leaked += len(set(ids_ex[0]) & set(ex))
    return {
        "load_s": round(load_s, 2),
        "index_rss_mib": round(rss_index, 0),
        "recall_at_10": round(recall_at_k(pos, truth[:nq], k), 4),
        "batch_queries": nq,
        "batch_qps": round(nq / batch_s, 1),
        "batch_qps_per_cpu_s": round(nq / max(batch_cpu, 1e-6), 1),
        "single_queries": ns,
        "single_ms_p50": round(1e3 * float(np.median(lat)), 3),
        "single_cpu_ms_mean": round(1e3 * single_cpu / ns, 3),
        "single_excl_ms_p50": round(1e3 * float(np.median(lat_ex)), 3) if lat_ex else None,
        "single_excl_cpu_ms_mean": round(1e3 * excl_cpu / ns, 3) if lat_ex else None,
        "excluded_returned": leaked,
    }


_BUILD_FIELDS = (
    "threads",
    "build_s",
    "build_cpu_s",
    "build_peak_rss_mib",
    "base_rss_mib",
    "index_mib",
    "kind",
    "factory",
    "meta_recall_at_10",
    "train_size",
    "train_s",
    "params",
)


def run_child(job: dict) -> dict:
    import os

    cmd = [sys.executable, __file__, "--child", json.dumps(job)]
    # idle OpenMP threads sleep instead of spinning: on shared cores spinning threads steal the CPU
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"child {job['mode']} {job['kind']} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--queries", type=int, default=1000, help="held-out queries (batched QPS, recall)")
    ap.add_argument(
        "--flat-queries", type=int, default=None, help="batched queries for flat/torch (default --queries)"
    )
    ap.add_argument(
        "--single-queries", type=int, default=200, help="queries timed one by one (flat/torch: 1/10)"
    )
    ap.add_argument(
        "--exclude", type=int, default=100, help="random ids excluded per query in the timed excl. search"
    )
    ap.add_argument(
        "--recall-sample", type=int, default=1000, help="catalog items build_index measures recall on"
    )
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--kinds", nargs="+", default=["flat", "hnsw", "ivf", "torch"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--threads", type=int, default=None, help="faiss OpenMP and torch threads to build (default: theirs)"
    )
    ap.add_argument("--work", default="/tmp/llmrec-index-bench", help="data and index folders (reused)")
    ap.add_argument(
        "--search-threads",
        type=int,
        default=1,
        help="threads while searching (default 1: per-core figures; faiss's multi-threaded flat scan of one "
        "query burns ~4x the CPU on 2 shared cores)",
    )
    ap.add_argument(
        "--reuse-builds",
        default=None,
        metavar="JSON",
        help="take the build figures of rows in this earlier --json output and only run the search child "
        "on their index folders (still under --work)",
    )
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        logging.basicConfig(level=logging.WARNING)
        print(json.dumps(child(json.loads(args.child))))
        return 0
    rows = []
    reused = json.loads(Path(args.reuse_builds).read_text()) if args.reuse_builds else []
    for n in args.sizes:
        data = write_dataset(Path(args.work), n, args.dim, args.queries, args.k)
        for kind in args.kinds:
            exact = kind in ("flat", "torch")
            job = {
                "kind": kind,
                "data": str(data),
                "out": str(data / ("index-" + kind.replace(",", "_"))),
                "device": args.device,
                "threads": args.threads,
                "recall_sample": args.recall_sample,
                "batch_queries": (args.flat_queries or args.queries) if exact else args.queries,
                "single_queries": max(1, args.single_queries // 10) if exact else args.single_queries,
                "exclude": args.exclude,
            }
            t0 = time.perf_counter()
            row = {"n_items": n, "dim": args.dim, "threads": args.threads, "asked": kind}
            old = [r for r in reused if r["n_items"] == n and r["asked"] == kind]
            if old:
                row.update({k: v for k, v in old[0].items() if k in _BUILD_FIELDS})
            else:
                row.update(run_child({**job, "mode": "build"}))
            row.update(run_child({**job, "mode": "search", "threads": args.search_threads}))
            row["search_threads"] = args.search_threads
            row["wall_s"] = round(time.perf_counter() - t0, 1)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            write_json_report(rows, args.json, indent=1)  # partial results survive an interrupted run
        flat = next((r for r in rows if r["n_items"] == n and r["asked"] == "flat"), None)
        for r in rows:
            if flat and r["n_items"] == n and r is not flat:
                r["vs_flat"] = {
                    "build_s": round(r["build_s"] / flat["build_s"], 2),
                    "build_peak_rss": round(
                        r["build_peak_rss_mib"] / max(1.0, flat["build_peak_rss_mib"]), 2
                    ),
                    "index_rss": round(r["index_rss_mib"] / max(1.0, flat["index_rss_mib"]), 2),
                    "index_size": round(r["index_mib"] / flat["index_mib"], 3),
                    "batch_qps": round(r["batch_qps"] / flat["batch_qps"], 1),
                    "qps_per_cpu_s": round(r["batch_qps_per_cpu_s"] / flat["batch_qps_per_cpu_s"], 1),
                    "build_cpu_s": round(r["build_cpu_s"] / max(0.1, flat["build_cpu_s"]), 2),
                    "single_latency": round(r["single_ms_p50"] / flat["single_ms_p50"], 4),
                }
    print(
        "| kind | items x dim | build s wall (CPU) | build peak RSS MiB | index MiB | loaded RSS MiB | "
        "recall@10 held-out (build-time) | batch QPS wall (per CPU-s) | 1-query p50 ms (excl.) | params | "
        "vs flat: size, QPS/CPU-s |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        vs = r.get("vs_flat")
        ratios = f"{vs['index_size']}x, {vs['qps_per_cpu_s']}x" if vs else ""
        print(
            f"| {r['kind']} | {r['n_items']:,} x {r['dim']} | {r['build_s']} ({r['build_cpu_s']}) | "
            f"{r['build_peak_rss_mib']:.0f} | {r['index_mib']} | {r['index_rss_mib']:.0f} | "
            f"{r['recall_at_10']} ({r['meta_recall_at_10']}) | "
            f"{r['batch_qps']} ({r['batch_qps_per_cpu_s']}) | "
            f"{r['single_ms_p50']} ({r['single_excl_ms_p50']}) | {r['params'] or ''} | {ratios} |"
        )
    write_json_report(rows, args.json, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
