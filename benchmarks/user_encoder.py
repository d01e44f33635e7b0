"""User encoders at equal budget, compared on validation (issue 14: "GRU vs causal transformer with more
layers and proper dropout").

For each variant and seed, `llmrec train --holdout loo --epochs E --seed S <variant flags>` on a run's data
and embeddings (the pipeline's training: same split, epochs, batch, negatives and post-training choices), into
RUN/exp-user-encoder/<variant>-s<seed>. Every fit writes the NDCG@10 of each validation user under the final
ranking as served (scorer/val_ndcg.npy, fingerprinted in meta.json "served_val"); fits of one seed rank the
same validation users, so each variant is compared with the first one user by user: the mean paired
difference over all seeds' users and its 95% interval (`llmrec.metrics.bootstrap_ci` over the per-user
differences of every seed pooled, as the evaluation's paired intervals).
Only validation is read: the test split is never scored here.

    python benchmarks/user_encoder.py --run runs/amazon-magazine-subscriptions-2018 --seeds 0 1 \\
        --out runs/bench/user-encoder-magazine.json

Variants (`--variants`, names from VARIANTS): tf1 (the default: 1 causal transformer layer, dropout 0.1), tf2
(2 layers, dropout 0.2), gru1 (1 GRU layer, dropout 0.1), gru2 (2 GRU layers, dropout 0.2); and one loss:
tf1-full (tf1 with the full softmax over the catalog instead of 128 logQ-corrected sampled negatives).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from llmrec.artifacts import write_json_report
from llmrec.metrics import bootstrap_ci

VARIANTS: dict[str, list[str]] = {
    "tf1": ["--user-encoder", "transformer", "--n-layers", "1", "--dropout", "0.1"],
    "tf2": ["--user-encoder", "transformer", "--n-layers", "2", "--dropout", "0.2"],
    "gru1": ["--user-encoder", "gru", "--n-layers", "1", "--dropout", "0.1"],
    "gru2": ["--user-encoder", "gru", "--n-layers", "2", "--dropout", "0.2"],
    # the loss at tf1's encoder: the full softmax over the catalog instead of 128 logQ-corrected samples
    "tf1-full": ["--user-encoder", "transformer", "--n-layers", "1", "--dropout", "0.1", "--n-neg", "-1"],
}


def fit(run: Path, out: Path, variant: str, seed: int, epochs: int, reuse: bool) -> dict[str, Any]:
    """One `llmrec train` (skipped when `reuse` and out holds a finished fit); its meta and per-user
    scores."""
    meta_file = out / "meta.json"
    if not (reuse and meta_file.is_file() and (out / "val_ndcg.npy").is_file()):
        cmd = [sys.executable, "-m", "llmrec", "train", "--data", str(run / "data"), "--embeddings",
               str(run / "embeddings"), "--out", str(out), "--holdout", "loo", "--epochs", str(epochs),
               "--seed", str(seed), *VARIANTS[variant]]
        out.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with open(out.parent / f"{out.name}.log", "w") as log:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
        if rc != 0:
            raise SystemExit(f"{' '.join(cmd)} failed (exit {rc}); see {out.parent / (out.name + '.log')}")
        print(f"{variant} seed {seed}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    meta = json.loads(meta_file.read_text())
    return {"meta": meta, "per_user": np.load(out / "val_ndcg.npy")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="run folder with data/ and embeddings/ (llmrec pipeline)")
    p.add_argument("--variants", nargs="+", default=["tf1", "tf2", "gru1"], choices=sorted(VARIANTS),
                   help="the first is the reference of the paired differences (default: tf1 tf2 gru1)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--epochs", type=int, default=5, help="training epochs of every fit (the pipeline's: 5)")
    p.add_argument("--reuse", action="store_true", help="keep fits already in RUN/exp-user-encoder")
    p.add_argument("--out", default=None, help="JSON report path")
    args = p.parse_args(argv)
    run = Path(args.run)
    for sub in ("data", "embeddings"):
        if not (run / sub).is_dir():
            raise SystemExit(f"{run / sub} is missing: run `llmrec pipeline --stages prepare,embed` first")
    fits = {(v, s): fit(run, run / "exp-user-encoder" / f"{v}-s{s}", v, s, args.epochs, args.reuse)
            for s in args.seeds for v in args.variants}
    ref = args.variants[0]
    rows = []
    for v in args.variants:
        diffs, means = [], []
        for s in args.seeds:
            a, b = fits[(v, s)], fits[(ref, s)]
            if a["meta"]["served_val"]["targets_sha1"] != b["meta"]["served_val"]["targets_sha1"]:
                raise SystemExit(f"{v} and {ref} at seed {s} were validated on different users")
            diffs.append(a["per_user"] - b["per_user"])
            means.append(float(a["per_user"].mean()))
        d = np.concatenate(diffs)
        rows.append({
            "variant": v, "flags": " ".join(VARIANTS[v]), "val_ndcg@10_by_seed": means,
            "val_ndcg@10": float(np.mean(means)), "diff_vs_ref": float(d.mean()),
            "ci95": [float(x) for x in bootstrap_ci(d)], "n_user_pairs": int(len(d)),
            "best_epoch_by_seed": [fits[(v, s)]["meta"]["best_epoch"] for s in args.seeds],
            "train_s_per_fit": float(np.mean([fits[(v, s)]["meta"]["wall_s"] for s in args.seeds])),
        })
    report = {"run": str(run), "reference": ref, "seeds": args.seeds, "epochs": args.epochs, "rows": rows}
    write_json_report(report, args.out, echo=True)
    print(f"\n{'variant':<8} {'val ndcg@10 (seeds)':<28} {'diff vs ' + ref:<10} {'95% interval':<20} s/fit",
          file=sys.stderr)
    for r in rows:
        seeds = " / ".join(f"{x:.4f}" for x in r["val_ndcg@10_by_seed"])
        print(f"{r['variant']:<8} {seeds:<28} {r['diff_vs_ref']:+.4f}    "
              f"[{r['ci95'][0]:+.4f}, {r['ci95'][1]:+.4f}]  {r['train_s_per_fit']:.0f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
