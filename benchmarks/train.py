"""Scorer training throughput: Ray Train (TorchTrainer, 1 and 2 CPU workers) vs a plain single-process loop.

Same model, same samples, same hyper-parameters, same run. Reported per configuration:
- `train examples/s`: examples / seconds inside the epoch loops (the steady-state training rate; for Ray, the
  workers' own timing of the epochs, summed over workers), best epoch after the first (warm-up) one;
- `end-to-end s`: wall time of the whole fit (for Ray: worker group start, Ray Data, checkpoints, teardown).

Data: `--data DIR --embeddings DIR` (artifacts of `llmrec prepare` / `llmrec embed`), else a planted synthetic
set (topic-clustered 384-d text vectors, users walking one topic).

    python benchmarks/train.py --epochs 3 --out /tmp/bench_train.json
    python benchmarks/train.py --data runs/ml/data --embeddings runs/ml/embeddings --epochs 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from llmrec.artifacts import write_json_report

logger = logging.getLogger("benchmarks.train")


def synthetic(n_items: int, n_users: int, events: int, text_dim: int = 384, seed: int = 0):
    from llmrec.protocol import ItemSpace

    rng = np.random.default_rng(seed)
    n_topics = 20
    topic = np.arange(n_items) % n_topics
    tv = rng.normal(size=(n_topics, text_dim))[topic] + 0.6 * rng.normal(size=(n_items, text_dim))
    tv = (tv / np.linalg.norm(tv, axis=1, keepdims=True)).astype(np.float32)
    ids = np.array([f"i{i:06d}" for i in range(n_items)])
    rows = []
    for u in range(n_users):
        pool = np.flatnonzero(topic == u % n_topics)
        seq = rng.choice(pool, size=min(events, len(pool)), replace=False)
        rows += [(f"u{u:05d}", ids[i], 1_700_000_000 + 60 * j, np.nan, "click") for j, i in enumerate(seq)]
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "ts", "rating", "event"])
    return ItemSpace(ids, tv), df


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None)
    p.add_argument("--embeddings", default=None)
    p.add_argument("--n-items", type=int, default=2000)
    p.add_argument("--n-users", type=int, default=1000)
    p.add_argument("--events", type=int, default=30)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", default="1,2", help="Ray Train worker counts to run (comma list)")
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads of the plain loop (Ray workers get 1)"
    )
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    args = p.parse_args(argv)

    from llmrec.log import setup_logging
    from llmrec.raysetup import init_ray, local_env_defaults, ray_detail_to_log_files

    local_env_defaults()
    ray_detail_to_log_files()  # Ray Data's progress dumps to the session's log files
    setup_logging("INFO")
    import torch

    from llmrec.config import TrainConfig
    from llmrec.scorer.recommender import split_last_event
    from llmrec.scorer.train import fit_local, fit_scorer

    if args.data:
        from llmrec.data.tables import read_interactions
        from llmrec.embed.artifact import load_embeddings
        from llmrec.protocol import ItemSpace

        emb = load_embeddings(args.embeddings)
        items, inter = ItemSpace(emb.item_ids, emb.vectors), read_interactions(args.data)
        source = f"{args.data} + {args.embeddings}"
    else:
        items, inter = synthetic(args.n_items, args.n_users, args.events)
        source = f"synthetic {args.n_items} items x {args.n_users} users x {args.events} events"
    train, valid = split_last_event(inter)
    common = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=3e-3, seed=0, patience=100)
    results = []

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    _, hist = fit_local(common, train, items, valid)
    wall = time.perf_counter() - t0
    results.append(_row(f"plain torch loop ({args.threads} thread)", hist, wall))

    init_ray()
    for w in [int(x) for x in args.workers.split(",") if x]:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            cfg = dataclasses.replace(common, num_workers=w)
            meta = fit_scorer(cfg, train, items, Path(tmp), valid_df=valid)
            wall = time.perf_counter() - t0
            ray_hist = _ray_history(Path(tmp))
        results.append(
            _row(
                f"Ray Train TorchTrainer, {w} CPU worker(s)",
                ray_hist,
                wall,
                val_ndcg=meta["metrics"].get("val_ndcg@10"),
            )
        )

    print(
        f"\nscorer training throughput, {source}, {len(train)} train events, {args.epochs} epochs, "
        f"batch {args.batch_size}\n"
    )
    print("| configuration | train examples/s (best epoch after the 1st) | end-to-end s | val ndcg@10 |")
    print("| --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['config']} | {r['examples_per_s']:.0f} | {r['wall_s']:.1f} | {r['val_ndcg@10']:.4f} |")
    base = results[0]["examples_per_s"]
    for r in results:
        r["throughput_vs_plain"] = r["examples_per_s"] / base
    print(
        json.dumps(
            {
                "baseline": results[0]["config"],
                "throughput_vs_plain": {r["config"]: round(r["throughput_vs_plain"], 3) for r in results},
            }
        )
    )
    write_json_report({"source": source, "baseline": results[0]["config"], "results": results}, args.out)
    return 0


def _row(name: str, hist: list[dict], wall: float, val_ndcg: float | None = None) -> dict:
    rates = [h["examples_per_s"] for h in hist]
    steady = max(rates[1:]) if len(rates) > 1 else rates[0]
    ndcg = val_ndcg if val_ndcg is not None else max(h.get("val_ndcg@10", 0.0) for h in hist)
    return {
        "config": name,
        "examples_per_s": steady,
        "epoch_rates": rates,
        "wall_s": wall,
        "val_ndcg@10": ndcg,
    }


def _ray_history(out: Path) -> list[dict]:
    """Per-epoch metrics of the Ray run (the last checkpoint holds every epoch's rate)."""
    import torch

    state = torch.load(out / "last_checkpoint" / "checkpoint.pt", map_location="cpu", weights_only=True)
    return state.get("history", [state["metrics"]])


if __name__ == "__main__":
    sys.exit(main())
