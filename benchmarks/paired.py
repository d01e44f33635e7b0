"""Paired comparison of two evaluations of the same split: one model's per-user NDCG@10 in A and in B
(`RUN/eval/per_user.parquet` of `llmrec evaluate`), their means and the 95% paired bootstrap interval of
A - B (`llmrec.metrics.bootstrap_ci`, users resampled together). E.g. the same trained scorer ranked with and
without a ranking-time choice, so that training noise is out of the difference. Both files must hold the
same users for that protocol, model and seed.

    python benchmarks/paired.py T/eval/per_user.parquet T0/eval/per_user.parquet --model llmrec

`--model-b` compares two models instead (A's `--model` with B's `--model-b`), e.g. from two evaluations of
the same split that each ran some of the models.
"""

from __future__ import annotations

import argparse
import sys

import pandas as pd

from llmrec.metrics import bootstrap_ci


def paired(a: pd.DataFrame, b: pd.DataFrame, model: str, protocol: str, seed: int,
           model_b: str | None = None) -> dict[str, float]:
    """{"a", "b", "diff", "lo", "hi", "n_users"}: mean NDCG@10 of `model` in a and of `model_b` (default:
    the same model) in b, a - b and its interval."""

    def pick(df: pd.DataFrame, name: str, model: str) -> pd.Series:
        s = df[(df["model"] == model) & (df["protocol"] == protocol) & (df["seed"] == seed)]
        if s.empty:
            raise SystemExit(f"{name} has no rows for model {model!r}, protocol {protocol!r}, seed {seed}; "
                             f"it has models {sorted(df['model'].unique())}, protocols "
                             f"{sorted(df['protocol'].unique())}, seeds "
                             f"{sorted(int(v) for v in df['seed'].unique())}")
        return s.set_index("user_id")["ndcg@10"].sort_index()

    x, y = pick(a, "A", model), pick(b, "B", model_b or model)
    if not x.index.equals(y.index):
        raise SystemExit(f"A and B scored different users ({len(x)} vs {len(y)}, "
                         f"{len(x.index.symmetric_difference(y.index))} not in both): not the same split")
    lo, hi = bootstrap_ci(x.to_numpy(), y.to_numpy())
    return {"a": float(x.mean()), "b": float(y.mean()), "diff": float(x.mean() - y.mean()), "lo": lo,
            "hi": hi, "n_users": len(x)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a", help="per_user.parquet of evaluation A")
    p.add_argument("b", help="per_user.parquet of evaluation B")
    p.add_argument("--model", default="llmrec")
    p.add_argument("--model-b", default=None, help="B's model (default: --model)")
    p.add_argument("--protocol", default="loo")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    r = paired(pd.read_parquet(args.a), pd.read_parquet(args.b), args.model, args.protocol, args.seed,
               args.model_b)
    names = args.model if args.model_b in (None, args.model) else f"{args.model} vs {args.model_b}"
    print(f"{names} ({args.protocol}, {r['n_users']} users): A {r['a']:.4f}  B {r['b']:.4f}  "
          f"A - B {r['diff']:+.4f} [{r['lo']:+.4f}, {r['hi']:+.4f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
