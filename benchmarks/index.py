"""Index benchmark: build time, batched QPS, single-query latency and recall@10 vs exact, per kind and size.

Data: seeded clustered synthetic unit vectors (topics -> sub-topics -> items with per-item noise, the same
recipe as tests/test_item_index.py) and held-out queries from the same distribution.

    .venv/bin/python benchmarks/index.py --sizes 10000 100000 --dim 384 --kinds flat hnsw ivf torch
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

import numpy as np

from llmrec.index.item_index import ItemIndex, exact_topk, recall_at_k
from llmrec.log import setup_logging

logger = logging.getLogger(__name__)


def make_data(
    n: int, d: int, n_queries: int, seed: int = 0, noise: float = 1.3
) -> tuple[np.ndarray, np.ndarray]:
    """Items (n, d) and queries (n_queries, d), float32, unit rows."""
    rng = np.random.default_rng(seed)
    topics = rng.normal(size=(max(8, n // 500), d))
    subs = topics[rng.integers(0, len(topics), max(80, n // 50))] + 0.7 * rng.normal(
        size=(max(80, n // 50), d)
    )

    def draw(m: int, r: np.random.Generator) -> np.ndarray:
        v = subs[r.integers(0, len(subs), m)] + noise * r.uniform(0.5, 1.5, size=(m, 1)) * r.normal(
            size=(m, d)
        )
        return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)

    return draw(n, rng), draw(n_queries, np.random.default_rng(seed + 1))


def bench_one(kind: str, x: np.ndarray, q: np.ndarray, exact: np.ndarray, k: int, device: str) -> dict:
    ids = [f"i{j}" for j in range(len(x))]
    t0 = time.perf_counter()
    idx = ItemIndex.build(x, ids, kind=kind, device=device)
    build_s = time.perf_counter() - t0
    idx.search(q[:8], k)  # warm-up
    t0 = time.perf_counter()
    _, got = idx.search(q, k)
    batch_s = time.perf_counter() - t0
    lat = []
    for row in q[:200]:
        t1 = time.perf_counter()
        idx.search(row[None, :], k)
        lat.append(time.perf_counter() - t1)
    pos = np.array([[idx.position(i) if i else -1 for i in r] for r in got])
    return {
        "kind": idx.kind,
        "n_items": len(x),
        "dim": x.shape[1],
        "build_s": round(build_s, 2),
        "batch_qps": round(len(q) / batch_s),
        "single_ms_p50": round(1e3 * float(np.median(lat)), 3),
        "recall_at_10": round(recall_at_k(pos, exact, k), 4),
        "params": {p: v for p, v in idx.params.items() if p in ("M", "ef_search", "nlist", "nprobe")},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--kinds", nargs="+", default=["flat", "hnsw", "ivf", "torch"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--threads", type=int, default=None, help="faiss OpenMP and torch threads (default: theirs)"
    )
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    args = ap.parse_args(argv)
    setup_logging("WARNING")
    if args.threads:
        import faiss
        import torch

        faiss.omp_set_num_threads(args.threads)
        torch.set_num_threads(args.threads)
    rows = []
    for n in args.sizes:
        x, q = make_data(n, args.dim, args.queries)
        _, exact = exact_topk(x, q, args.k)
        for kind in args.kinds:
            row = bench_one(kind, x, q, exact, args.k, args.device)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    print("| kind | items x dim | build s | batch QPS | 1-query p50 ms | recall@10 | params |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['kind']} | {r['n_items']} x {r['dim']} | {r['build_s']} | {r['batch_qps']} | "
            f"{r['single_ms_p50']} | {r['recall_at_10']} | {r['params'] or ''} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
