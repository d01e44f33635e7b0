"""Training data on Ray Data: interactions -> per-user training samples built in Ray tasks, never in the
driver.

`training_data(source, items, ...)` reads the interactions (a parquet file or folder, a URI, a `RUN/data`
folder, a `ray.data.Dataset` or a pandas DataFrame) as a Ray Dataset, maps item ids to catalog rows in tasks,
hash-partitions the events by user (`repartition(keys=[user_id])`, so each block holds whole users), and
builds from each block, in tasks:

- the (history prefix, next item) samples (`scorer.data.build_samples`, the same function `fit_local` uses), a
  materialised Dataset in the object store that Ray Train workers stream through `get_dataset_shard`;
- the validation users: the last event of the `val_users` eligible users (>= 2 events) with the smallest
  seeded hash of their id (exactly `val_users` when there are that many), as `ValidationSet` rows;
- per item, training events and training targets (for the ID gate / ID slots / negative sampling / logQ);
- per user, the distinct positive items (training only, and with the validation event) for the co-occurrence
  matrix, built in one Ray task (`cooc_matrices`).

`focus_samples` keeps the samples of a fine-tune on new feedback (the new ones plus as many older ones).

The driver receives only catalog-sized arrays (counts per item), the validation rows (<= val_users) and a few
counters: it never holds per-event data. Events are ordered per user by (ts, item_id, event), so the samples
do not depend on input order.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from llmrec.cooc import ITEMKNN
from llmrec.data.histories import attach_item_idx, item_lookup, make_histories
from llmrec.data.order import sort_events
from llmrec.protocol import ItemSpace
from llmrec.schema import EVENT, INTERACTIONS_FILE, ITEM_ID, RATING, TS, USER_ID
from llmrec.scorer import data as sdata

logger = logging.getLogger(__name__)

_COLUMNS = (USER_ID, ITEM_ID, TS, RATING, EVENT)


@dataclass
class TrainingData:
    """What training needs, computed on Ray Data (see the module docstring)."""

    samples: Any  # ray.data.Dataset, materialised; columns scorer.data.SAMPLE_COLUMNS
    n_samples: int
    n_events: int  # training events (validation events excluded)
    n_users: int
    item_counts: np.ndarray  # float64 (N,) training events per item
    target_counts: np.ndarray  # float64 (N,) training targets per item
    val: sdata.ValidationSet | None
    # int64 (V,) catalog rows of the validation events (for the shipped co-occurrence)
    val_targets: np.ndarray
    ts_max: int | None  # latest ts of any event (training or validation)
    user_items: Any  # ray.data.Dataset: per user `items` (training positives), `val_item` (-1 = none)


EVENTS_PER_BLOCK = 200_000  # user partitions of the sample build: at least one per this many events


def source_dataset(source: Any, n_blocks: int | None = None) -> Any:
    """Interactions as a Ray Dataset with the canonical columns (see the module docstring for sources)."""
    import ray.data

    if isinstance(source, ray.data.Dataset):
        ds = source
    elif isinstance(source, pd.DataFrame):
        missing = [c for c in (USER_ID, ITEM_ID, TS, EVENT) if c not in source.columns]
        if missing:
            raise ValueError(f"interactions lack columns {missing}; got {list(source.columns)}")
        df = source[[c for c in _COLUMNS if c in source.columns]].copy()
        if RATING not in df.columns:
            df[RATING] = np.nan
        df[USER_ID] = df[USER_ID].astype(str)
        df[ITEM_ID] = df[ITEM_ID].astype(str)
        k = max(1, min(n_blocks or 8, len(df) // 4096 or 1))
        step = -(-len(df) // k) if len(df) else 1
        ds = ray.data.from_pandas([df.iloc[i : i + step] for i in range(0, max(len(df), 1), step)])
    else:
        path = str(source)
        if "://" not in path and Path(path).is_dir() and (Path(path) / INTERACTIONS_FILE).is_file():
            path = str(Path(path) / INTERACTIONS_FILE)
        ds = ray.data.read_parquet(path).select_columns(list(_COLUMNS))  # projected at the read (Ray 2.60)
    return ds


def training_data(
    source: Any,
    items: ItemSpace,
    max_len: int = 50,
    min_rating: float | None = None,
    val_users: int | None = 1000,
    seed: int = 0,
    n_blocks: int | None = None,
) -> TrainingData:
    """Build the training data on Ray Data (module docstring).

    Args:
        source: interactions (parquet file/folder/URI, RUN/data, ray Dataset or DataFrame).
        items: the catalog (its `item_ids` order defines item rows).
        max_len: L, history events per sample.
        min_rating: rating events below it are no targets.
        val_users: validation users (0 = none; None = every eligible user).
        seed: the validation users' hash seed.
        n_blocks: user partitions (default: 4 x the cluster's CPUs, at least 2, and at least one per
            EVENTS_PER_BLOCK events, so a block's memory does not grow with the data).
    """
    with ordered_blocks():
        return _training_data(source, items, max_len, min_rating, val_users, seed, n_blocks)


@contextlib.contextmanager
def ordered_blocks() -> Iterator[None]:
    """Ray Data keeps blocks in input order (not task completion order) while inside: the same inputs give the
    same sample order, so one seed trains one model."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    kept = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True
    try:
        yield
    finally:
        ctx.execution_options.preserve_order = kept


def _training_data(
    source: Any, items: ItemSpace, max_len: int, min_rating: float | None, val_users: int | None, seed: int,
    n_blocks: int | None,
) -> TrainingData:
    import ray
    import ray.data

    from llmrec.raysetup import cluster_cpus

    t0 = time.perf_counter()
    src = source_dataset(source, n_blocks)
    if n_blocks is None:
        # enough user partitions that one holds ~EVENTS_PER_BLOCK events: a sample-building task's memory
        # follows its block, which a fixed count would let grow with the data (10M events in 8 blocks: 2.5 GB)
        n_rows = len(source) if isinstance(source, pd.DataFrame) else int(src.count())
        n_blocks = max(2, int(4 * cluster_cpus()), -(-n_rows // EVENTS_PER_BLOCK))
    ids_ref = ray.put(np.asarray(items.item_ids).astype(str))
    ds = src.map_batches(
        _AttachItemIdx, fn_constructor_args=(ids_ref,), batch_format="pandas",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, n_blocks)),
        num_cpus=0.5,
    )
    by_user = ds.repartition(n_blocks, keys=[USER_ID]).materialize()
    # pass 1: per block, eligible users and the smallest seeded hashes among them -> the validation threshold
    stats = by_user.map_batches(
        _block_stats, fn_kwargs={"seed": seed, "keep": val_users}, batch_size=None, batch_format="pandas"
    ).to_pandas()
    n_users = int(stats["n_users"].sum())
    n_events_all = int(stats["n_events"].sum())
    ts_max = int(stats["ts_max"].max()) if n_events_all else None
    hashes = (
        np.sort(np.concatenate([np.asarray(h, np.float64) for h in stats["hashes"]])) if len(stats) else []
    )
    if val_users is None:
        threshold = np.inf
    elif val_users <= 0 or len(hashes) == 0:
        threshold = -np.inf
    else:
        threshold = float(hashes[min(val_users, len(hashes)) - 1])
    kw = {"seed": seed, "threshold": threshold, "max_len": max_len, "min_rating": min_rating}
    samples = by_user.map_batches(_block_samples, fn_kwargs=kw, batch_size=None, batch_format="pandas")
    # one global order from the samples' content (a distributed sort, no driver copy): the block order of a
    # hash repartition depends on task timing, and one seed must train one model
    samples = samples.sort(ORDER_KEY).drop_columns([ORDER_KEY]).materialize()
    val_rows = by_user.map_batches(_block_validation, fn_kwargs=kw, batch_size=None, batch_format="pandas")
    val_df = val_rows.to_pandas()
    n_items = items.n_items
    counts = by_user.map_batches(
        _block_item_counts, fn_kwargs={**kw, "n_items": n_items}, batch_size=None, batch_format="pandas"
    ).to_pandas()
    item_counts = np.zeros(n_items)
    target_counts = np.zeros(n_items)
    if len(counts):
        np.add.at(item_counts, counts["item"].to_numpy(np.int64), counts["events"].to_numpy(np.float64))
        np.add.at(target_counts, counts["item"].to_numpy(np.int64), counts["targets"].to_numpy(np.float64))
    user_items = by_user.map_batches(_block_user_items, fn_kwargs=kw, batch_size=None, batch_format="pandas")
    n_samples = samples.count()
    val, val_targets = _validation_set(val_df, max_len)
    logger.info(
        "training data on Ray Data: %d events of %d users -> %d samples, %d validation users (%.1fs)",
        n_events_all, n_users, n_samples, 0 if val is None else val.n_users, time.perf_counter() - t0,
    )
    return TrainingData(
        samples=samples, n_samples=n_samples, n_events=int(item_counts.sum()), n_users=n_users,
        item_counts=item_counts, target_counts=target_counts, val=val, val_targets=val_targets, ts_max=ts_max,
        user_items=user_items,
    )


def user_hash(user_ids: np.ndarray, seed: int) -> np.ndarray:
    """float64 (U,) in [0, 1): a seeded, process-independent hash of each user id (crc32)."""
    return np.array([zlib.crc32(f"{seed}:{u}".encode("utf-8", "surrogatepass")) / 2**32 for u in user_ids])


class _AttachItemIdx:
    """map_batches class: canonical columns + `item_idx` (catalog row); unknown item ids raise."""

    def __init__(self, item_ids: Any) -> None:
        import ray

        if isinstance(item_ids, ray.ObjectRef):  # the catalog ids travel once through the object store
            item_ids = ray.get(item_ids)
        self.lookup = item_lookup(item_ids)  # built once per actor, not per batch

    def __call__(self, df: pd.DataFrame) -> pd.DataFrame:
        df = attach_item_idx(df, self.lookup)
        df[USER_ID] = df[USER_ID].astype(str)
        df[ITEM_ID] = df[ITEM_ID].astype(str)
        return df


def _split(df: pd.DataFrame, seed: int, threshold: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train events, validation events) of a block of whole users, ordered; validation = the last event of
    users with >= 2 events whose hash <= threshold."""
    d = sort_events(df)
    if not len(d):
        return d, d
    users = d[USER_ID].to_numpy()
    last = np.r_[users[1:] != users[:-1], True]
    size = d.groupby(USER_ID, sort=False)[USER_ID].transform("size").to_numpy()
    u_last = users[last]
    chosen = set(u_last[(user_hash(u_last, seed) <= threshold) & (size[last] >= 2)])
    to_val = last & np.isin(users, list(chosen)) if chosen else np.zeros(len(d), bool)
    return d[~to_val].reset_index(drop=True), d[to_val].reset_index(drop=True)


def _block_stats(df: pd.DataFrame, seed: int, keep: int | None) -> pd.DataFrame:
    d = df
    size = d.groupby(USER_ID)[USER_ID].size()
    eligible = size.index[size >= 2].to_numpy()
    h = np.sort(user_hash(eligible, seed))
    if keep is not None:
        h = h[: max(keep, 0)]
    return pd.DataFrame({"n_users": [len(size)], "n_events": [len(d)],
                         "ts_max": [int(d[TS].max()) if len(d) else -1], "hashes": [h.tolist()]})


def _block_samples(df: pd.DataFrame, seed: int, threshold: float, max_len: int, min_rating: float | None
                   ) -> dict[str, np.ndarray]:
    train, _ = _split(df, seed, threshold)
    dummy = ItemSpace(np.zeros(int(train["item_idx"].max()) + 1 if len(train) else 1), np.zeros((1, 1)))
    out = sdata.build_samples(train, dummy, max_len=max_len, min_rating=min_rating)
    out[ORDER_KEY] = _sample_keys(out, seed)
    return out


ORDER_KEY = "_order"  # a seeded hash of each sample's content: the samples' one global order (a shuffle)


def with_order_key(batch: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """A samples batch with its ORDER_KEY column (`_sample_keys`), for re-ordering after a selection."""
    return {**batch, ORDER_KEY: _sample_keys(batch, seed)}


def _sample_keys(samples: dict[str, np.ndarray], seed: int) -> np.ndarray:
    """uint64 per sample from its content (target, its ts, history items / events / ratings) and the seed: the
    order does not depend on which task or block built a sample."""
    n = len(samples["target"])
    if n == 0:
        return np.zeros(0, np.uint64)
    rows = np.concatenate([samples["hist_idx"].astype(np.int64).view(np.uint8).reshape(n, -1),
                           samples["hist_event"].astype(np.int64).view(np.uint8).reshape(n, -1),
                           np.nan_to_num(samples["hist_rating"], nan=-1.0).astype(np.float64).view(np.uint8)
                           .reshape(n, -1)], axis=1)
    frame = pd.DataFrame({"t": samples["target"].astype(np.int64),
                          "ts": samples["target_ts"].astype(np.int64),
                          "h": [r.tobytes() for r in rows]})
    h = pd.util.hash_pandas_object(frame, index=False).to_numpy(np.uint64)
    with np.errstate(over="ignore"):
        return (h ^ np.uint64(seed % 2**63)) * np.uint64(0x9E3779B97F4A7C15)


def _block_validation(df: pd.DataFrame, seed: int, threshold: float, max_len: int, min_rating: float | None
                      ) -> pd.DataFrame:
    train, valid = _split(df, seed, threshold)
    valid = valid[sdata.target_mask(valid, min_rating)] if len(valid) else valid
    rows = []
    hists = {h.user_id: h for h in make_histories(train[train[USER_ID].isin(set(valid[USER_ID]))])}
    for uid, target in zip(valid[USER_ID], valid["item_idx"], strict=True):
        h = hists.get(uid)
        if h is None:
            continue
        idx, ev, rt, ln = sdata.pad_histories([h], max_len)
        rows.append({USER_ID: uid, "hist_idx": idx[0].tolist(), "hist_event": ev[0].tolist(),
                     "hist_rating": rt[0].tolist(), "hist_len": int(ln[0]), "target": int(target),
                     "exclude": np.unique(h.item_idx).tolist(),
                     "positives": sdata.positive_items(h).tolist()})
    return pd.DataFrame(rows, columns=[USER_ID, "hist_idx", "hist_event", "hist_rating", "hist_len", "target",
                                       "exclude", "positives"])


def _block_item_counts(df: pd.DataFrame, seed: int, threshold: float, max_len: int, min_rating: float | None,
                       n_items: int) -> pd.DataFrame:
    train, _ = _split(df, seed, threshold)
    item = train["item_idx"].to_numpy(np.int64)
    users = train[USER_ID].to_numpy()
    first = np.r_[True, users[1:] != users[:-1]] if len(users) else np.zeros(0, bool)
    # as build_samples: positions >= 1, target kinds
    is_target = ~first & sdata.target_mask(train, min_rating)
    ev = np.bincount(item, minlength=n_items)
    tg = np.bincount(item[is_target], minlength=n_items)
    nz = np.flatnonzero(ev | tg)
    return pd.DataFrame({"item": nz, "events": ev[nz], "targets": tg[nz]})


def _block_user_items(df: pd.DataFrame, seed: int, threshold: float, max_len: int, min_rating: float | None
                      ) -> pd.DataFrame:
    train, valid = _split(df, seed, threshold)
    pos = train[sdata.target_mask(train)]
    items = pos.groupby(USER_ID)["item_idx"].agg(lambda x: np.unique(x.to_numpy()).tolist())
    vmask = sdata.target_mask(valid) if len(valid) else np.zeros(0, bool)
    val_item = dict(zip(valid[USER_ID][vmask], valid["item_idx"][vmask], strict=True)) if len(valid) else {}
    users = sorted(set(items.index) | set(val_item))
    return pd.DataFrame({USER_ID: users, "items": [items.get(u, []) for u in users],
                         "val_item": [int(val_item.get(u, -1)) for u in users]})


def _validation_set(df: pd.DataFrame, max_len: int) -> tuple[sdata.ValidationSet | None, np.ndarray]:
    if not len(df):
        return None, np.zeros(0, np.int64)
    df = df.sort_values(USER_ID).reset_index(drop=True)
    stack = lambda col, dt: np.asarray(np.stack(df[col].map(np.asarray).to_list()), dtype=dt)  # noqa: E731
    val = sdata.ValidationSet(
        hist_idx=stack("hist_idx", np.int32), hist_event=stack("hist_event", np.int8),
        hist_rating=stack("hist_rating", np.float32), hist_len=df["hist_len"].to_numpy(np.int64),
        targets=[np.array([t], np.int64) for t in df["target"]],
        exclude=[np.asarray(e, np.int64) for e in df["exclude"]],
        positives=[np.asarray(p, np.int64) for p in df["positives"]],
    )
    return val, df["target"].to_numpy(np.int64)


def focus_samples(samples: Any, after_ts: int, seed: int = 0) -> Any:
    """Every sample with target_ts > after_ts plus about as many older ones (a Ray Dataset op), in the
    samples' own seeded order (`training_data`: new and old interleaved). The older ones are those
    whose content hash falls below n_new / n_old of the hash range, so the choice does not depend on how the
    samples are cut into blocks."""
    n_new = samples.filter(lambda r: r["target_ts"] > after_ts).count()
    n_old = samples.count() - n_new
    if n_new == 0:
        raise ValueError(f"no training sample has a target after ts {after_ts}; nothing new to learn from")
    limit = 2**64 if n_old <= n_new else int(n_new / n_old * 2**64)
    with ordered_blocks():  # blocks in the samples' order
        keyed = samples.map_batches(with_order_key, fn_kwargs={"seed": seed + 1}, batch_format="numpy")
        kept = keyed.filter(lambda r: r["target_ts"] > after_ts or int(r[ORDER_KEY]) < limit)
        out = kept.drop_columns([ORDER_KEY]).materialize()
    logger.info("fine-tune focus: %d samples after ts %d + ~%d of %d older ones", n_new, after_ts,
                min(n_old, n_new), n_old)
    return out


def cooc_matrices(
    user_items: Any,
    n_items: int,
    n_neighbors: int,
    train_terms: Sequence[str] = (ITEMKNN,),
    full_terms: Sequence[str] = (ITEMKNN,),
) -> tuple[dict[str, Any], dict[str, Any]]:
    """({term: matrix over training positives}, {term: matrix over training + validation positives}) for the
    named behaviour terms (`llmrec.cooc.candidate_terms`), built in one Ray task that streams the per-user
    item lists (the driver never holds them) into item x item counts (`llmrec.cooc.CoocCounts`): the task
    holds the counts and one chunk of users, not every event."""
    import ray

    train_terms, full_terms = list(train_terms), list(full_terms)

    @ray.remote(num_cpus=1)
    def build(ds: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        from llmrec.cooc import CoocCounts

        train, full = CoocCounts(n_items), CoocCounts(n_items)
        for b in ds.iter_batches(batch_format="pandas", batch_size=4096):
            lists = [np.asarray(lst, np.int64) for lst in b["items"]]
            if train_terms:
                train.add(lists)
            if full_terms:
                full.add([np.append(lst, v) if v >= 0 else lst
                          for lst, v in zip(lists, b["val_item"], strict=True)])
        return ({t: train.matrix(t, n_neighbors) for t in train_terms},
                {t: full.matrix(t, n_neighbors) for t in full_terms})

    return ray.get(build.remote(user_items))


def storage_path(out_dir: str | os.PathLike, checkpoint_dir: str | None) -> str:
    """Ray Train's run storage: `checkpoint_dir` (a shared folder or URI, e.g. s3://bucket/ckpt) when given,
    else OUT/ray on this machine's disk (single node only)."""
    if checkpoint_dir:
        return str(checkpoint_dir) if "://" in str(checkpoint_dir) else str(Path(checkpoint_dir).resolve())
    return str((Path(out_dir) / "ray").resolve())
