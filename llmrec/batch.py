"""Batch recommendations on Ray Data, ranked exactly as `GET /recommend` ranks (`RecommendCore` +
`Scorer.rank`).

`recommend_users(run_dir, data_dir, users, k, out)`:

    users -> (user_id, pos, shard = `state.store.shard_of`, the serving shards' hash), one Ray Data block per
    shard -> actor pool `_Ranker`: loads catalog + index + scorer once per actor
    and the base histories of the shard it is handed (`state.base.load_base`, the loader the serving shards
    use), ranks each block's users -> rows (user_id, item_id, rank, score) -> sorted by the users' input order
    -> one parquet file written by streaming the part files (`out` ending in .parquet), or a folder of parts.

The driver holds the user-id list it was given (or none, for a users file read by Ray Data), the counts of
users without interactions, and never a history or a recommendation list.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from llmrec.schema import RUN_INDEX, RUN_SCORER, USER_ID

logger = logging.getLogger(__name__)

OUT_COLUMNS = (USER_ID, "item_id", "rank", "score")


def recommend_users(
    run_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    users: list[str],
    k: int,
    out: str | os.PathLike,
    n_candidates: int | None = None,
    n_shards: int | None = None,
    skip_unknown: bool = False,
) -> dict[str, Any]:
    """Write the top-k of every user (input order) to `out`; returns {n_users, n_rows, n_unknown, wall_s}.

    Raises:
        ValueError: users without interactions in `data_dir` (unless skip_unknown), or nothing to rank.
    """
    import ray
    import ray.data

    from llmrec.raysetup import cluster_cpus
    from llmrec.state.store import shard_of

    t0 = time.perf_counter()
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n_shards = n_shards or max(1, min(len(users), int(2 * cluster_cpus())))
    frame = pd.DataFrame({USER_ID: users, "pos": np.arange(len(users), dtype=np.int64)})
    frame["shard"] = [shard_of(u, n_shards) for u in users]
    # one block per shard, cut here (the ids are in this process already): no shuffle, whose aggregator
    # actors and tasks can starve an actor pool on a small cluster (PLATFORM.md G3)
    ds = ray.data.from_pandas([g for _, g in frame.groupby("shard", sort=True)])
    actors = max(1, min(n_shards, int(cluster_cpus())))
    ranked = ds.map_batches(
        _Ranker,
        fn_constructor_args=(str(run_dir), str(data_dir), k, n_candidates, n_shards),
        batch_size=None,
        batch_format="pandas",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=0.25,  # PLATFORM.md G3: pools of 1-CPU actors starve the other tasks on 2 CPUs
    ).materialize()
    unknown = ranked.filter(lambda r: r["item_id"] is None and r["rank"] == 0)
    n_unknown = unknown.count()
    if n_unknown:
        examples = [r[USER_ID] for r in unknown.take(5)]
        if not skip_unknown:
            raise ValueError(
                f"{n_unknown} of {len(users)} users have no interactions in {data_dir} "
                f"(e.g. {examples}); pass "
                "--skip-unknown to leave them out"
            )
        logger.warning(
            "skipping %d of %d users without interactions (e.g. %s)", n_unknown, len(users), examples
        )
    rows = ranked.filter(lambda r: r["rank"] > 0).sort(["pos", "rank"]).drop_columns(["pos"])
    n_rows = _write(rows, Path(out))
    if n_rows == 0:
        raise ValueError(
            f"no user of the {len(users)} given has interactions in {data_dir}; nothing to recommend"
        )
    wall = time.perf_counter() - t0
    logger.info(
        "recommended for %d users (%d rows) on Ray Data in %.1fs", len(users) - n_unknown, n_rows, wall
    )
    return {"n_users": len(users) - n_unknown, "n_rows": n_rows, "n_unknown": n_unknown, "wall_s": wall}


class _Ranker:
    """Actor: the serving ranking for blocks of one state shard's users (see the module docstring)."""

    def __init__(self, run_dir: str, data_dir: str, k: int, n_candidates: int | None, n_shards: int) -> None:
        from llmrec.index.item_index import ItemIndex
        from llmrec.scorer.inference import Scorer
        from llmrec.serve.recommend_core import RankConfig, RecommendCore, load_catalog

        run = Path(run_dir)
        catalog, embed_meta = load_catalog(run)
        index = ItemIndex.load(run / RUN_INDEX, expect_embed_meta=embed_meta)
        rank = RankConfig() if n_candidates is None else RankConfig(min_candidates=n_candidates)
        self.core = RecommendCore(catalog, index, scorer=Scorer.load(run / RUN_SCORER), config=rank)
        self.data_dir, self.k, self.n_shards = data_dir, int(k), int(n_shards)
        self._base: tuple[int, Any] | None = None

    def _shard_base(self, shard: int) -> Any:
        from llmrec.state.base import load_base

        if self._base is None or self._base[0] != shard:
            self._base = (shard, load_base(self.data_dir, shard_id=shard, n_shards=self.n_shards))
        return self._base[1]

    def __call__(self, df: pd.DataFrame) -> pd.DataFrame:
        from llmrec.serve.user_view import UserView
        from llmrec.state.user_state import summary

        out: list[dict[str, Any]] = []
        for shard, part in df.groupby("shard", sort=False):
            base = self._shard_base(int(shard))
            views, keep = [], []
            for u, pos in zip(part[USER_ID], part["pos"], strict=True):
                r = base.row(str(u))
                if r is None:  # no interactions: reported (rank 0), never ranked as a new user
                    out.append({USER_ID: u, "item_id": None, "rank": 0, "score": np.nan, "pos": int(pos)})
                    continue
                views.append(UserView.from_state(summary(base.state(r, history_len=200)), str(u)))
                keep.append(int(pos))
            for b in range(0, len(views), 256):
                for view, pos, recs in zip(views[b : b + 256], keep[b : b + 256],
                                           self.core.recommend(views[b : b + 256], k=self.k), strict=True):
                    out += [{USER_ID: view.user_id, "item_id": r["item_id"], "rank": i + 1,
                             "score": np.float32(r["score"]), "pos": pos} for i, r in enumerate(recs)]
        return pd.DataFrame(out, columns=[*OUT_COLUMNS, "pos"])


def _write(rows: Any, out: Path) -> int:
    """`out` ending in .parquet: one file, the sorted rows streamed in order into one writer (the driver holds
    one batch at a time); anything else: a folder of part files written by the workers (rows of a user stay
    together and in rank order; the order across parts is not the users-file order)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.parent.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([(USER_ID, pa.string()), ("item_id", pa.string()), ("rank", pa.int32()),
                        ("score", pa.float32())])
    rows = rows.select_columns(list(OUT_COLUMNS))
    if out.suffix == ".parquet":
        tmp = out.with_name(out.name + ".tmp")
        n = 0
        try:
            with pq.ParquetWriter(tmp, schema) as w:
                for batch in rows.iter_batches(batch_format="pyarrow", batch_size=65536):
                    t = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
                    w.write_table(t.cast(schema))
                    n += len(t)
            tmp.replace(out)
        finally:
            tmp.unlink(missing_ok=True)
        return n
    stage = Path(tempfile.mkdtemp(prefix=".llmrec-recs-", dir=out.parent))
    try:
        rows.write_parquet(str(stage))
        n = sum(pq.ParquetFile(f).metadata.num_rows for f in stage.glob("*.parquet"))
        if out.exists():
            shutil.rmtree(out)
        stage.rename(out)
        return n
    finally:
        shutil.rmtree(stage, ignore_errors=True)
