"""`llmrec recommend`: batch top-k recommendations for a list of users as of the end of the training data.

`--model llmrec` (default) ranks exactly as `GET /recommend` of `llmrec serve` on the same run does for a user
the run knows, on Ray Data (`llmrec.batch`): actors hold RUN/scorer, RUN/embeddings and RUN/index once each,
the users' states are built from RUN/data (or --data) the way a state shard loads them (the last 200 events,
every item seen, negatives; `llmrec.state.base`), and `RecommendCore` ranks them (`Scorer.rank`: retrieval +
re-rank + co-occurrence); items the user has seen are never recommended. A baseline name fits that baseline on
all interactions first (history = every interaction of the user). The users file is a text file (one id per
line; blank lines and lines starting with '#' ignored), or a .parquet / .csv with a `user_id` column (with
`--model llmrec` also a folder of .parquet parts; that model reads the file with Ray Data's tasks, so no
process holds the whole id list). Each id is ranked once. Output: parquet `user_id, item_id, rank (1 = best),
score`, users in file order (first occurrence). A user may get fewer than k rows when
fewer than k items are rankable for them (logged with a count). With `--model llmrec`, `--run`, `--data`,
`--users` and `--out` URIs go to the Ray workers as they are (each node stages the run into its own cache), so
the job runs on any node of a cluster without a shared disk; baselines stage them through this process.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from llmrec import storage
from llmrec.schema import RUN_DATA, RUN_EMBEDDINGS, RUN_INDEX, RUN_SCORER
from llmrec.storage import Arg, In, OutFile, Run

logger = logging.getLogger(__name__)

HELP = "write top-k recommendations (user_id, item_id, rank, score) for the users listed in a file"
MODELS = ("llmrec", "popularity", "itemknn", "als", "sasrec", "zeroshot_text")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run folder (data/, embeddings/, scorer/)")
    p.add_argument(
        "--users", required=True, help="user ids: text file (one per line), .parquet or .csv with user_id"
    )
    p.add_argument("--k", type=int, default=10, help="recommendations per user (default 10)")
    p.add_argument(
        "--out", required=True,
        help="output: a .parquet file (users in file order), or a folder of parquet parts written by the "
        "workers",
    )
    p.add_argument("--model", default="llmrec", choices=MODELS, help="model (default llmrec)")
    p.add_argument("--data", default=None, help="prepare folder (default RUN/data)")
    p.add_argument(
        "--skip-unknown",
        action="store_true",
        help="skip users without interactions (counted) instead of failing",
    )
    p.add_argument(
        "--n-candidates", type=int, default=None,
        help="llmrec: retrieval candidates per user beyond those for k (RankConfig.min_candidates; default: "
        "the serving default)",
    )
    p.add_argument(
        "--users-per-shard", type=int, default=None,
        help="llmrec: users per hash shard at most, one ranker block each; bounds a ranker's memory "
        "(default: llmrec.batch.USERS_PER_SHARD, 50000)",
    )
    p.add_argument(
        "--num-rankers", type=int, default=None,
        help="llmrec: ranker actors (each loads the run once); default: one per CPU, at most one per "
        "llmrec.batch.USERS_PER_RANKER (2000) users",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for baselines that train (default 0)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: embedded local Ray)")


def storage_args(args: argparse.Namespace) -> dict[str, Arg]:
    """Flags that may be URIs, staged by llmrec.cli through this process's disk, except with `--model llmrec`
    where the Ray workers read the run, the data and the users file and write the output themselves (any
    node, `llmrec.batch`): there only URIs other processes cannot open (memory://) are staged."""
    spec: dict[str, Arg] = {
        "run": Run((RUN_DATA, RUN_EMBEDDINGS, RUN_INDEX, RUN_SCORER)),
        "data": In("prepare"),
        "users": In(),
        "out": OutFile(),
    }
    if getattr(args, "model", "llmrec") != "llmrec":
        return spec
    return {n: arg for n, arg in spec.items() if not storage.shared_across_processes(getattr(args, n))}


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import pandas as pd

    from llmrec.data.histories import attach_item_idx, make_histories
    from llmrec.embed.artifact import load_item_space
    from llmrec.eval.evaluate import read_tables
    from llmrec.schema import USER_ID

    t0 = time.perf_counter()
    if args.k < 1:
        raise ValueError(f"--k must be >= 1, got {args.k}")
    if args.model == "llmrec":  # on Ray Data, the serving ranking (llmrec.batch); the users file too
        from llmrec.batch import recommend_users
        from llmrec.raysetup import init_ray

        init_ray(address=getattr(args, "address", None))
        data = args.data or storage.join(args.run, RUN_DATA)  # a local path or a URI, as given
        per_shard = {} if args.users_per_shard is None else {"users_per_shard": args.users_per_shard}
        res = recommend_users(args.run, data, args.users, args.k, args.out, args.n_candidates,
                              skip_unknown=args.skip_unknown, num_rankers=args.num_rankers, **per_shard)
        print(f"wrote {res['n_rows']} recommendations for {res['n_users']} users (llmrec, k={args.k}) to "
              f"{storage.shown(args.out)} in {res['wall_s']:.1f}s")
        return 0
    run_dir = Path(args.run)
    data_dir = Path(args.data) if args.data else run_dir / RUN_DATA
    users = read_user_ids(args.users)
    items_df, inter = read_tables(data_dir)
    known = set(inter[USER_ID].unique())
    unknown = [u for u in users if u not in known]
    if unknown:
        if not args.skip_unknown:
            raise ValueError(
                f"{len(unknown)} of {len(users)} users have no interactions in {data_dir} "
                f"(e.g. {unknown[:5]}); "
                f"pass --skip-unknown to leave them out"
            )
        logger.warning(
            "skipping %d of %d users without interactions (e.g. %s)", len(unknown), len(users), unknown[:5]
        )
        users = [u for u in users if u in known]
    if not users:
        raise ValueError(f"no user of {args.users} has interactions in {data_dir}; nothing to recommend")

    # baselines: fitted here on all interactions, in this process
    from llmrec.eval.baselines import make_baseline
    from llmrec.metrics import topk_indices

    space, _ = load_item_space(run_dir / RUN_EMBEDDINGS, items_df)
    item_ids = space.item_ids
    inter = attach_item_idx(inter, space, unknown="drop")  # counted and logged
    model: Any = make_baseline(args.model, seed=args.seed)
    model.fit(inter, space)
    histories = make_histories(inter, users)
    idx, scores = _batched(
        lambda h: topk_indices(model.score(h), args.k, [np.unique(x.item_idx) for x in h]), histories
    )
    ok = np.isfinite(scores) & (idx >= 0)  # (U, k)
    short = int((ok.sum(axis=1) < args.k).sum())
    if short:
        logger.warning(
            "%d of %d users have fewer than %d rankable items; they get fewer rows", short, len(users), args.k
        )
    u_rows, r_cols = np.nonzero(ok)
    out = pd.DataFrame(
        {
            USER_ID: np.asarray(users, dtype=object)[u_rows],
            "item_id": item_ids[idx[u_rows, r_cols]],
            "rank": (r_cols + 1).astype(np.int32),
            "score": scores[u_rows, r_cols].astype(np.float32),
        }
    )
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    out.to_parquet(tmp, index=False)
    tmp.replace(out_path)
    dt = time.perf_counter() - t0
    logger.info("recommended for %d users with %s in %.1fs", len(users), args.model, dt)
    print(f"wrote {len(out)} recommendations for {len(users)} users ({args.model}, k={args.k}) to {out_path}")
    return 0


def read_user_ids(path: str | Path) -> list[str]:
    """User ids from a text file (one per line), or a .parquet / .csv with a `user_id` column; de-duplicated,
    first-occurrence order."""
    import pandas as pd

    from llmrec.schema import USER_ID

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"users file {p} not found")
    if p.suffix in (".parquet", ".csv"):
        df = pd.read_parquet(p) if p.suffix == ".parquet" else pd.read_csv(p, dtype={USER_ID: str})
        if USER_ID not in df.columns:
            raise ValueError(
                f"{p} has no {USER_ID!r} column (columns: {list(df.columns)}); add one or pass a "
                f"text file with one id per line"
            )
        ids = [str(u) for u in df[USER_ID].dropna()]
    else:
        ids = [line.strip() for line in p.read_text().splitlines()]
        ids = [u for u in ids if u and not u.startswith("#")]
    uniq = list(dict.fromkeys(ids))
    if len(uniq) < len(ids):
        logger.info(
            "users file lists %d ids, %d distinct; recommending once per distinct id", len(ids), len(uniq)
        )
    if not uniq:
        raise ValueError(f"{p} lists no user ids")
    return uniq


def _batched(fn: Any, histories: list, batch: int = 1024) -> tuple[Any, Any]:
    import numpy as np

    idx, sc = [], []
    for s in range(0, len(histories), batch):
        i, v = fn(histories[s : s + batch])
        idx.append(np.asarray(i))
        sc.append(np.asarray(v, dtype=np.float32))
    return np.concatenate(idx), np.concatenate(sc)
