"""Batch recommendations on Ray Data, ranked exactly as `GET /recommend` ranks (`RecommendCore` +
`Scorer.rank`).

`recommend_users(run_dir, data_dir, users, k, out)`:

    users file -> Ray Data read tasks (text: one id per line; .parquet / .csv / a folder of parquet parts:
    a `user_id` column), in file order -> `_split` tasks: each block's ids with their position (block, row)
    cut by `state.store.shard_of`, the serving shards' hash, into one part per shard; shards sized by users
    (`USERS_PER_SHARD`) -> `_gather` tasks: one block per shard, each id once (its first position)
    -> actor pool `_Ranker`: loads catalog + index + scorer once per actor and, per block, the base histories
    of that block's users (`state.base.load_base`, the loader the serving shards use, keeping only the users
    asked for), ranks them -> rows (user_id, item_id, rank, score) -> sorted by the users' input order
    -> part files written by the workers -> one parquet file (`out` ending in .parquet) streamed from the
    parts in position order by this process, one record batch at a time, or the folder of parts.

`run_dir`, `data_dir`, the users file and `out` may be URIs (s3://, gs://, ...; `llmrec.storage`): the read
tasks read the users file from the bucket, each ranker stages the run into its own node's artifact cache (once
per node), and the workers write their part files to a staging prefix beside `out`, so no node needs a file
that only the driver's disk has.

The driver holds object references and counts (ids read, distinct ids, users without interactions), never
the user-id list, a history or a recommendation list; a ranker holds the base histories of one block (at most
`USERS_PER_SHARD` users) at a time, however many users the run has.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from llmrec.schema import (
    INTERACTIONS_FILE,
    META_FILE,
    RUN_DATA,
    RUN_EMBEDDINGS,
    RUN_INDEX,
    RUN_SCORER,
    USER_ID,
)

logger = logging.getLogger(__name__)

OUT_COLUMNS = (USER_ID, "item_id", "rank", "score")
USERS_PER_SHARD = 50_000  # users per shard at most: bounds a ranker's base histories, whatever the users file
_POS = ("block", "row")  # a user's position in the users file: (block of the read, row in that block)


def recommend_users(
    run_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    users: Sequence[str] | str | os.PathLike,
    k: int,
    out: str | os.PathLike,
    n_candidates: int | None = None,
    n_shards: int | None = None,
    skip_unknown: bool = False,
    users_per_shard: int = USERS_PER_SHARD,
    num_rankers: int | None = None,
) -> dict[str, Any]:
    """Write the top-k of every user (input order, each id once) to `out`.

    Args:
        users: a users file (path or URI; see `read_users`) or the ids themselves (an in-memory list).
        n_shards: hash shards of the users; None = max(2 x cluster CPUs, ceil(ids / users_per_shard)),
            at most one per id.
        num_rankers: ranker actors (at most one per shard); None = one per CPU, at most one per
            USERS_PER_RANKER distinct ids.

    Returns:
        {n_users, n_rows, n_unknown, n_ids, n_rankers, wall_s}: n_ids counts the ids read (duplicates
        included); n_rankers the ranker actors used (`num_rankers`, or its default).

    Raises:
        ValueError: users without interactions in `data_dir` (unless skip_unknown), no ids, nothing to rank.
        FileNotFoundError: no users file.
    """
    import ray
    import ray.data
    from ray.data.expressions import col

    from llmrec.raysetup import cluster_cpus

    t0 = time.perf_counter()
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if users_per_shard < 1:
        raise ValueError(f"users_per_shard must be >= 1, got {users_per_shard}")
    if num_rankers is not None and num_rankers < 1:
        raise ValueError(f"num_rankers must be >= 1 or None, got {num_rankers}")
    _check_run(run_dir, data_dir)
    source = _user_dataset(users)
    n_ids = source.ds.count()
    if n_ids == 0:
        raise ValueError(f"{source.name} lists no user ids")
    n_shards = n_shards or max(int(2 * cluster_cpus()), -(-n_ids // users_per_shard))
    n_shards = max(1, min(n_shards, n_ids))
    # one block per shard, cut by tasks that see one block each: no shuffle, whose aggregator actors and tasks
    # can starve an actor pool on a small cluster (PLATFORM.md G3), and no id list in this process
    split, gather = ray.remote(_split_impl), ray.remote(_gather_impl)
    blocks = (ref for bundle in source.ds.iter_internal_ref_bundles() for ref in bundle.block_refs)
    split = split.options(num_returns=n_shards)
    parts = [split.remote(ref, b, n_shards, source.is_text) for b, ref in enumerate(blocks)]
    parts = [p if n_shards > 1 else [p] for p in parts]
    gathered = [gather.options(num_returns=2).remote(*(p[s] for p in parts)) for s in range(n_shards)]
    sizes = ray.get([n for _, n in gathered])
    n_distinct = int(sum(sizes))
    if n_distinct == 0:
        raise ValueError(f"{source.name} lists no user ids (blank lines and # comments only)")
    if n_distinct < n_ids:
        logger.info("%s lists %d ids, %d distinct; recommending once per distinct id", source.name, n_ids,
                    n_distinct)
    ds = ray.data.from_arrow_refs([t for (t, _), n in zip(gathered, sizes, strict=True) if n])
    # the ranker pool starts work only when all its actors are up (default: as soon as one is), so every
    # ranker gets a share of the blocks: an actor on a node that still stages the run from a bucket would
    # find the work done by the first one up. `ds.context` is this dataset's own (a Dataset seals a copy of
    # DataContext.get_current() when it is created).
    ds.context.wait_for_min_actors_s = RANKERS_START_S
    # a ranker per CPU, but one per USERS_PER_RANKER users at most: each more one loads the run (seconds)
    auto = min(int(cluster_cpus()), -(-n_distinct // USERS_PER_RANKER))
    actors = max(1, min(n_shards, num_rankers or auto))
    ranked = ds.map_batches(
        _Ranker,
        fn_constructor_args=(os.fspath(run_dir), os.fspath(data_dir), k, n_candidates, n_shards),
        batch_size=None,
        batch_format="pandas",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=0.25,  # PLATFORM.md G3: pools of 1-CPU actors starve the other tasks on 2 CPUs
    ).materialize()
    unknown = ranked.filter(expr=col("rank") == 0)  # rank 0: a user without interactions
    n_unknown = unknown.count()
    if n_unknown:
        examples = [r[USER_ID] for r in unknown.take(5)]
        if not skip_unknown:
            raise ValueError(
                f"{n_unknown} of {n_distinct} users have no interactions in {data_dir} "
                f"(e.g. {examples}); pass "
                "--skip-unknown to leave them out"
            )
        logger.warning(
            "skipping %d of %d users without interactions (e.g. %s)", n_unknown, n_distinct, examples
        )
    n_rows = _write(ranked.filter(expr=col("rank") > 0).sort([*_POS, "rank"]), os.fspath(out))
    if n_rows == 0:
        raise ValueError(
            f"no user of the {n_distinct} given has interactions in {data_dir}; nothing to recommend"
        )
    wall = time.perf_counter() - t0
    logger.info(
        "recommended for %d users (%d rows, %d shards) on Ray Data in %.1fs",
        n_distinct - n_unknown, n_rows, n_shards, wall,
    )
    return {"n_users": n_distinct - n_unknown, "n_rows": n_rows, "n_unknown": n_unknown, "n_ids": n_ids,
            "n_rankers": actors, "wall_s": wall}


RUN_PARTS = (RUN_DATA, RUN_EMBEDDINGS, RUN_INDEX, RUN_SCORER)  # what a ranker reads of a run
# users that pay for one more ranker actor: starting one (torch, the scorer, the index) takes ~5 s of a
# 2-core machine, in which a ranker ranks ~2,000 users (460 users/s per core at 1M users)
USERS_PER_RANKER = 2000
RANKERS_START_S = 600.0  # the whole ranker pool must be up within this, else Ray's "Timed out while starting
# actors" error (the pool is sized from the CPUs the cluster has now, so it never waits for an autoscaler)


def _check_run(run_dir: str | os.PathLike, data_dir: str | os.PathLike) -> None:
    """Fail in the driver, before any worker starts, when a part the rankers need has no meta.json."""
    from llmrec import storage

    for part, stage in ((RUN_EMBEDDINGS, "embed"), (RUN_INDEX, "index"), (RUN_SCORER, "train")):
        if not storage.exists(storage.join(run_dir, part, META_FILE)):
            raise FileNotFoundError(
                f"{storage.shown(storage.join(run_dir, part))} has no {META_FILE}: run `llmrec {stage}` (or "
                f"`llmrec pipeline`) for this run first"
            )
    data = os.fspath(data_dir)
    if not storage.exists(data if data.partition("?")[0].endswith(".parquet")
                          else storage.join(data, INTERACTIONS_FILE)):
        raise FileNotFoundError(
            f"no {INTERACTIONS_FILE} at {storage.shown(data)}: pass a prepare folder (--data) or run `llmrec "
            "prepare` first"
        )


def _local_inputs(run_dir: str, data_dir: str) -> tuple[Path, Path]:
    """The run and data folders on this worker's node: a URI is staged into this node's artifact cache
    (`storage.default_cache_root`; reused while its meta.json is unchanged, shared by the node's actors)."""
    from llmrec import storage

    cache = storage.default_cache_root(os.environ)
    run = storage.stage_in_run(run_dir, cache, RUN_PARTS) if storage.is_uri(run_dir) else Path(run_dir)
    data = (storage.stage_in(data_dir, cache, need_meta=False) if storage.is_uri(data_dir)
            else Path(data_dir))
    return run, data


@dataclass(frozen=True)
class UsersSource:
    """A users file read by Ray Data: `ds` (lazy), `name` for messages, `is_text`: one id per line in column
    `text` (stripped; blank lines and # comments left out), else a `user_id` column."""

    ds: Any
    name: str
    is_text: bool


def _user_dataset(users: Sequence[str] | str | os.PathLike) -> UsersSource:
    """The users as a materialized source whose blocks are in input order."""
    import pyarrow as pa
    import ray.data

    if not isinstance(users, (str, os.PathLike)):
        ids = pa.table({USER_ID: pa.array([str(u) for u in users], pa.string())})
        return UsersSource(ray.data.from_arrow(ids), "the user list", is_text=False)
    from llmrec.scorer.dataset import ordered_blocks

    with ordered_blocks():  # blocks in file order: positions are (block, row)
        src = read_users(users)
        return UsersSource(src.ds.materialize(), src.name, src.is_text)


def read_users(path: str | os.PathLike) -> UsersSource:
    """A users file as a lazy Ray Dataset (read by Ray Data's tasks, not this process).

    Formats: a text file (one id per line, column `text`), a .parquet or .csv file or a folder of .parquet
    parts (a `user_id` column; other types are read as strings). `path` may be a URI (`llmrec.storage`); the
    read tasks open it themselves, on whichever node they run.

    Raises:
        FileNotFoundError: no such file or folder. ValueError: no `user_id` column.
    """
    import csv
    import io

    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq
    import ray.data

    from llmrec import storage

    name = storage.shown(path)
    fs, fpath = storage.filesystem_and_path(path)
    info = fs.get_file_info(fpath)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"users file {name} not found")
    fix = "add one or pass a text file with one id per line"
    if fpath.endswith(".parquet") or info.type == pafs.FileType.Directory:
        first = fpath if info.type == pafs.FileType.File else _first_parquet(fs, fpath, name)
        with fs.open_input_file(first) as f:
            names = pq.read_schema(f).names
        if USER_ID not in names:
            raise ValueError(f"{name} has no {USER_ID!r} column (columns: {names}); {fix}")
        ds = ray.data.read_parquet(fpath, filesystem=fs).select_columns([USER_ID])
        return UsersSource(ds, name, is_text=False)
    if fpath.endswith(".csv"):
        with fs.open_input_stream(fpath) as f:
            header = f.read(65536).decode("utf-8", errors="replace").splitlines()[:1]
        names = next(csv.reader(io.StringIO(header[0] if header else "")), [])
        if USER_ID not in names:
            raise ValueError(f"{name} has no {USER_ID!r} column (columns: {names}); {fix}")
        opts = pcsv.ConvertOptions(column_types={USER_ID: pa.string()}, include_columns=[USER_ID])
        return UsersSource(ray.data.read_csv(fpath, convert_options=opts, filesystem=fs), name, is_text=False)
    return UsersSource(ray.data.read_text(fpath, drop_empty_lines=True, filesystem=fs), name, is_text=True)


def _first_parquet(fs: Any, folder: str, name: str) -> str:
    files = _parquet_files(fs, folder, recursive=True)
    if not files:
        raise FileNotFoundError(f"users folder {name} holds no .parquet file")
    return files[0]


def _split_impl(block: Any, b: int, n_shards: int, is_text: bool) -> Any:
    """One block of ids -> n_shards tables (user_id, block, row, shard): blanks, comments and nulls out; the
    one table itself for one shard (a task of num_returns=1 returns its value as one object)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    from ray.data.block import BlockAccessor

    from llmrec.state.base import crc32_strings

    t = BlockAccessor.for_block(block).to_arrow()
    ids = pc.cast(t.column("text" if is_text else USER_ID), pa.string()).to_pylist()
    if is_text:
        ids = [u.strip() for u in ids]
    keep = [i for i, u in enumerate(ids) if u is not None and u != "" and not (is_text and u.startswith("#"))]
    ids, rows = [ids[i] for i in keep], np.asarray(keep, dtype=np.int64)
    arr = pa.array(ids, pa.string())
    shard = (crc32_strings(arr) % np.uint32(n_shards)).astype(np.int64)  # = state.store.shard_of, vectorised
    full = pa.table({USER_ID: arr, "block": pa.array(np.full(len(ids), b, np.int64)),
                     "row": pa.array(rows), "shard": pa.array(shard)})
    if n_shards == 1:
        return full
    return [full.filter(pa.array(shard == s)) for s in range(n_shards)]


def _gather_impl(*parts: Any) -> tuple[Any, int]:
    """A shard's parts -> (one table, each id once at its first position; its row count)."""
    import pyarrow as pa

    t = pa.concat_tables(parts) if parts else pa.table({USER_ID: pa.array([], pa.string())})
    if t.num_rows == 0:
        return t, 0
    df = t.to_pandas().sort_values(list(_POS), kind="stable").drop_duplicates(USER_ID, keep="first")
    return pa.Table.from_pandas(df, preserve_index=False), len(df)


class _Ranker:
    """Actor: the serving ranking for blocks of one state shard's users (see the module docstring)."""

    def __init__(self, run_dir: str, data_dir: str, k: int, n_candidates: int | None, n_shards: int) -> None:
        from llmrec.index.item_index import ItemIndex
        from llmrec.scorer.inference import Scorer
        from llmrec.serve.recommend_core import RankConfig, RecommendCore, load_catalog

        run, data = _local_inputs(run_dir, data_dir)
        catalog, embed_meta = load_catalog(run)
        index = ItemIndex.load(run / RUN_INDEX, expect_embed_meta=embed_meta)
        rank = RankConfig() if n_candidates is None else RankConfig(min_candidates=n_candidates)
        self.core = RecommendCore(catalog, index, scorer=Scorer.load(run / RUN_SCORER), config=rank)
        self.data_dir, self.k, self.n_shards = data, int(k), int(n_shards)

    def __call__(self, df: pd.DataFrame) -> pd.DataFrame:
        from llmrec.serve.user_view import UserView
        from llmrec.state.base import load_base
        from llmrec.state.user_state import summary

        out: list[dict[str, Any]] = []
        for shard, part in df.groupby("shard", sort=False):  # one block = one shard's users
            base = load_base(self.data_dir, shard_id=int(shard), n_shards=self.n_shards,
                             only=part[USER_ID].astype(str).tolist())
            views, keep = [], []
            for u, *pos in zip(part[USER_ID], *(part[c] for c in _POS), strict=True):
                r = base.row(str(u))
                if r is None:  # no interactions: reported (rank 0), never ranked as a new user
                    out.append({USER_ID: u, "item_id": None, "rank": 0, "score": np.nan,
                                **dict(zip(_POS, map(int, pos), strict=True))})
                    continue
                views.append(UserView.from_state(summary(base.state(r, history_len=200)), str(u)))
                keep.append(dict(zip(_POS, map(int, pos), strict=True)))
            for b in range(0, len(views), 256):
                for view, pos, recs in zip(views[b : b + 256], keep[b : b + 256],
                                           self.core.recommend(views[b : b + 256], k=self.k), strict=True):
                    out += [{USER_ID: view.user_id, "item_id": r["item_id"], "rank": i + 1,
                             "score": np.float32(r["score"]), **pos} for i, r in enumerate(recs)]
        frame = pd.DataFrame(out, columns=[*OUT_COLUMNS, *_POS])
        return frame.astype({"rank": np.int32, "score": np.float32})


def _write(rows: Any, out: str) -> int:
    """Write `rows` (sorted by position, position columns included) to `out`, a local path or a URI.

    The workers write the sorted blocks (range partitions of the sort) as part files into a staging folder
    beside `out` (on the bucket for a URI: every node reaches it), each part a contiguous range of positions.
    `out` ending in .parquet: this process orders the parts by first position and streams
    them, one record batch at a time, into one file (checking that positions only grow across parts), written
    locally and renamed, or uploaded when complete (`storage.stage_out_file`). Anything else: the folder of
    those parts replaces `out` (rows of a user stay together and in rank order; the order across parts is not
    the users-file order). The staging folder is removed in every case."""
    from llmrec import storage

    fs, path = storage.filesystem_and_path(out)
    parent = posixpath.dirname(path)
    fs.create_dir(parent, recursive=True)
    stage = f"{parent}/.llmrec-recs-{uuid.uuid4().hex[:16]}"
    try:
        if not path.endswith(".parquet"):
            rows.select_columns(list(OUT_COLUMNS)).write_parquet(stage, filesystem=fs)
            files = _parquet_files(fs, stage)
            n = sum(_num_rows(fs, f) for f in files)
            _replace_folder(fs, stage, files, path)
            return n
        rows.write_parquet(stage, filesystem=fs)
        if storage.is_uri(out):
            with storage.stage_out_file(out, storage.default_cache_root(os.environ)) as local:
                return _merge_parts(fs, _parquet_files(fs, stage), local)
        tmp = Path(path + ".tmp")
        try:
            n = _merge_parts(fs, _parquet_files(fs, stage), tmp)
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
        return n
    finally:
        with contextlib.suppress(FileNotFoundError):
            fs.delete_dir(stage)


def _parquet_files(fs: Any, folder: str, recursive: bool = False) -> list[str]:
    """The .parquet files in `folder` (and below it with `recursive`), sorted; none if it does not exist."""
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(folder, recursive=recursive, allow_not_found=True))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet"))


def _num_rows(fs: Any, file: str) -> int:
    import pyarrow.parquet as pq

    with fs.open_input_file(file) as f:
        return int(pq.ParquetFile(f).metadata.num_rows)


def _replace_folder(fs: Any, stage: str, files: list[str], out: str) -> None:
    """The part files in `stage` become the folder `out`. Locally a rename (the old folder removed first);
    on object storage each part is moved in, then the previous version's .parquet files are deleted."""
    import pyarrow.fs as pafs

    if isinstance(fs, pafs.LocalFileSystem):
        if os.path.exists(out):
            shutil.rmtree(out)
        os.rename(stage, out)
        return
    old = set(_parquet_files(fs, out))
    fs.create_dir(out, recursive=True)
    new = {f"{out}/{posixpath.basename(f)}" for f in files}
    for f in files:
        fs.move(f, f"{out}/{posixpath.basename(f)}")
    for f in sorted(old - new):
        fs.delete_file(f)


def _merge_parts(fs: Any, files: list[str], dest: Path) -> int:
    """Stream the sorted part files, ordered by their first position, into one parquet file at `dest`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([(USER_ID, pa.string()), ("item_id", pa.string()), ("rank", pa.int32()),
                        ("score", pa.float32())])
    key_cols = [*_POS, "rank"]
    parts = []
    for f in files:
        with fs.open_input_file(f) as fh:
            pf = pq.ParquetFile(fh)
            if pf.metadata.num_rows:
                first = next(pf.iter_batches(batch_size=1, columns=key_cols))
                parts.append((tuple(first.column(c)[0].as_py() for c in key_cols), f))
    parts.sort(key=lambda p: p[0])
    n, last = 0, None
    with pq.ParquetWriter(dest, schema) as w:
        for _, f in parts:
            with fs.open_input_file(f) as fh:
                for batch in pq.ParquetFile(fh).iter_batches(batch_size=65536):
                    t = pa.Table.from_batches([batch])
                    first = tuple(t.column(c)[0].as_py() for c in key_cols)
                    if last is not None and first <= last:
                        raise RuntimeError(f"batch recommendations out of order at position {first} after "
                                           f"{last} (part {posixpath.basename(f)}): a bug, please report it")
                    last = tuple(t.column(c)[-1].as_py() for c in key_cols)
                    w.write_table(t.select(list(OUT_COLUMNS)).cast(schema))
                    n += len(t)
    return n
