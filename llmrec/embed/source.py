"""The input of `llmrec embed`: find the items parquet file(s) and check their rows with Ray tasks.

- `resolve_items(items) -> ItemsSource`: a parquet file, a folder with items.parquet (a `llmrec prepare`
  folder) or a folder of parquet shards, local or at a URI; schema and row counts from the parquet footers on
  the driver (no rows read there).
- `check_items(src, driver_node) -> {"sha256"}`: one Ray task per file counts null ids / texts and empty ids,
  hashes the file's bytes, and splits its ids' 64-bit hashes into partitions; one task per partition finds
  repeated hashes; the ids behind them are read back (a few) to name them and to rule out hash collisions.
  The driver holds per-file counts and object refs only. Tasks over local files run on the driver's node.
Tests: tests/test_ray_embed.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmrec import storage
from llmrec.schema import ITEM_ID, ITEMS_FILE, META_FILE, TEXT

logger = logging.getLogger(__name__)

__all__ = ["ItemsSource", "resolve_items", "check_items", "prepare_fingerprint", "open_input"]

ROWS_PER_DEDUP_TASK = 1_000_000  # ids (as 8-byte hashes) one duplicate-check task holds
_PARQUET_SUFFIXES = (".parquet", ".pq")


@dataclass(frozen=True)
class ItemsSource:
    """The parquet files of an items table; `files` are local paths (fs None) or paths inside `fs`."""

    location: str  # as given (a URI without its ?options), for messages and meta
    files: tuple[str, ...]  # in name order: the row order of the output
    shown: tuple[str, ...]  # each file as messages name it (URIs without ?options)
    rows: tuple[int, ...]  # per file, from the parquet footers
    fs: Any | None  # pyarrow filesystem for a URI, None for local paths

    @property
    def n_rows(self) -> int:
        return int(sum(self.rows))


def resolve_items(items: str | os.PathLike) -> ItemsSource:
    """Find the items parquet file(s) and check their schema from the footers (no rows are read).

    `items`: a parquet file; a folder with items.parquet (a `llmrec prepare` folder); or a folder of
    parquet shards (`*.parquet` / `*.pq`, in name order; names starting with "." or "_" are skipped).

    Raises:
        FileNotFoundError: nothing there, or a folder without items.parquet or shards.
        ValueError: missing / non-string item_id or text columns, or no rows.
    """
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    if storage.is_uri(items):
        fs, root = storage.filesystem_for(os.fspath(items))
        location = storage.shown(items)
    else:
        fs, root = pafs.LocalFileSystem(), str(Path(items).expanduser().resolve())
        location = str(Path(items).expanduser())
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(
            f"items table {location} does not exist; pass a parquet file, a folder of parquet shards or a "
            "`llmrec prepare` folder"
        )
    if info.type == pafs.FileType.Directory:
        names = sorted(
            i.path
            for i in fs.get_file_info(pafs.FileSelector(root))
            if i.type == pafs.FileType.File
            and i.base_name.lower().endswith(_PARQUET_SUFFIXES)
            and not i.base_name.startswith((".", "_"))
        )
        items_file = f"{root.rstrip('/')}/{ITEMS_FILE}"
        files = [items_file] if items_file in names else names
        if not files:
            raise FileNotFoundError(
                f"{location} is a folder without {ITEMS_FILE} or *.parquet shards; pass the items parquet "
                "file, a folder of shards or the folder written by `llmrec prepare`"
            )
    else:
        files = [root]
    is_dir = info.type == pafs.FileType.Directory
    shown = tuple(f"{location.rstrip('/')}/{f.rsplit('/', 1)[-1]}" if is_dir else location for f in files)
    rows, first_schema = [], None
    for f, where in zip(files, shown, strict=True):
        with fs.open_input_file(f) as fh:
            pf = pq.ParquetFile(fh)
            schema, nrows = pf.schema_arrow, pf.metadata.num_rows
        _check_schema(where, schema)
        types = [schema.field(c).type for c in (ITEM_ID, TEXT)]
        if first_schema is not None and types != first_schema:
            raise ValueError(
                f"{where}: {ITEM_ID!r} / {TEXT!r} types {types} differ from the first shard's "
                f"{first_schema}; write every shard with the same schema"
            )
        first_schema = types
        rows.append(int(nrows))
    if sum(rows) == 0:
        raise ValueError(f"{location} has no rows; nothing to embed")
    return ItemsSource(
        location=location,
        files=tuple(files),
        shown=shown,
        rows=tuple(rows),
        fs=fs if storage.is_uri(items) else None,
    )


def _check_schema(where: str, schema: Any) -> None:
    import pyarrow as pa

    missing = [c for c in (ITEM_ID, TEXT) if c not in schema.names]
    if missing:
        raise ValueError(
            f"{where} lacks column(s) {missing}: an items table needs {ITEM_ID!r} (string) and {TEXT!r} "
            f"(string), got columns {schema.names}; build it with `llmrec prepare`"
        )
    for col in (ITEM_ID, TEXT):
        t = schema.field(col).type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
            raise ValueError(
                f"{where}: column {col!r} must be string, got {t}; cast it to string (as `llmrec prepare` "
                "does)"
            )


def check_items(src: ItemsSource, driver_node: str) -> dict[str, Any]:
    """Ray tasks over the input files: nulls, empty ids, duplicate ids, sha256. Raises ValueError on bad rows.

    Duplicates: each file task hashes its ids (64-bit) into `P` partitions; one task per partition finds
    repeated hashes; the offending ids are then read back (at most a few) to name them and to rule out hash
    collisions. The driver only holds per-file counts and object refs.
    """
    import ray

    n_parts = max(1, min(256, math.ceil(src.n_rows / ROWS_PER_DEDUP_TASK)))
    pin = pinned(driver_node) if src.fs is None else {}
    scan = ray.remote(_scan_file).options(num_returns=1 + n_parts, **pin)
    refs = [scan.remote(src.fs, f, n_parts) for f in src.files]
    refs = [r if isinstance(r, list) else [r] for r in refs]
    stats = ray.get([r[0] for r in refs])
    shown = src.shown
    for col, key in ((ITEM_ID, "null_ids"), (TEXT, "null_texts")):
        total = sum(s[key] for s in stats)
        if total:
            i = next(k for k, s in enumerate(stats) if s[key])
            n_files = sum(1 for s in stats if s[key])
            more = f" in {n_files} files" if n_files > 1 else ""
            raise ValueError(
                f"{shown[i]}: {total} null value(s) in {col!r}{more} (first at row "
                f"{stats[i]['first_' + key]}); fill or drop those rows"
            )
    empty = sum(s["empty_ids"] for s in stats)
    if empty:
        raise ValueError(
            f"{src.location}: {empty} empty {ITEM_ID!r} value(s); every item needs a non-empty id"
        )
    dedup = ray.remote(_repeated_hashes)
    found = ray.get([dedup.remote(*[r[1 + j] for r in refs]) for j in range(n_parts)])
    n_dup = sum(c for c, _ in found)
    if n_dup:
        hashes = np.unique(np.concatenate([h for _, h in found]))
        named = ray.remote(_ids_with_hashes).options(**pin)
        ids = np.concatenate(ray.get([named.remote(src.fs, f, hashes) for f in src.files]))
        vals, counts = np.unique(ids.astype(str), return_counts=True)
        dups = vals[counts > 1]
        if len(dups):
            raise ValueError(
                f"{src.location}: {n_dup} duplicated {ITEM_ID!r} value(s) "
                f"(e.g. {[str(d) for d in dups[:5]]}); ids must be unique"
            )
        logger.info("%d 64-bit id hash collision(s) among distinct ids; no duplicates", n_dup)
    digests = [s["sha256"] for s in stats]
    if len(digests) == 1:
        sha = digests[0][:16]
    else:
        lines = "\n".join(f"{f.rsplit('/', 1)[-1]}\t{d}" for f, d in zip(src.files, digests, strict=True))
        sha = hashlib.sha256(lines.encode()).hexdigest()[:16]
    return {"sha256": sha}


def open_input(fs: Any | None, path: str) -> Any:
    """A pyarrow input file: `path` inside `fs`, or a local path when `fs` is None."""
    import pyarrow.fs as pafs

    return (fs or pafs.LocalFileSystem()).open_input_file(path)


def _scan_file(fs: Any | None, path: str, n_parts: int) -> list[Any]:
    """Ray task: [counts dict, the ids' 64-bit hashes of partition 0, ..., n_parts - 1] of one file."""
    import pandas as pd
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    h = hashlib.sha256()
    with open_input(fs, path) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    st = {"null_ids": 0, "null_texts": 0, "empty_ids": 0, "first_null_ids": -1, "first_null_texts": -1}
    parts: list[list[np.ndarray]] = [[] for _ in range(n_parts)]
    row = 0
    with open_input(fs, path) as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=65536, columns=[ITEM_ID, TEXT]):
            for col, key in ((ITEM_ID, "null_ids"), (TEXT, "null_texts")):
                c = batch.column(col)
                if c.null_count:
                    if st["first_" + key] < 0:
                        st["first_" + key] = row + pc.index(pc.is_null(c), True).as_py()
                    st[key] += c.null_count
            ids = batch.column(ITEM_ID)
            st["empty_ids"] += int(pc.sum(pc.equal(pc.utf8_length(ids), 0)).as_py() or 0)
            hashed = pd.util.hash_array(np.asarray(ids.fill_null("").to_numpy(zero_copy_only=False), object))
            for j in range(n_parts):
                parts[j].append(hashed[hashed % n_parts == j] if n_parts > 1 else hashed)
            row += batch.num_rows
    st["sha256"] = h.hexdigest()
    return [st, *[np.concatenate(p) if p else np.zeros(0, np.uint64) for p in parts]]


def _repeated_hashes(*parts: np.ndarray) -> tuple[int, np.ndarray]:
    """Ray task: (number of hash values seen more than once, up to 1000 of them) in one partition."""
    h = np.concatenate(parts) if parts else np.zeros(0, np.uint64)
    vals, counts = np.unique(h, return_counts=True)
    rep = vals[counts > 1]
    return int(len(rep)), rep[:1000]


def _ids_with_hashes(fs: Any | None, path: str, hashes: np.ndarray) -> np.ndarray:
    """Ray task: the ids of one file whose 64-bit hash is in `hashes` (object (k,))."""
    import pandas as pd
    import pyarrow.parquet as pq

    out = []
    with open_input(fs, path) as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=65536, columns=[ITEM_ID]):
            ids = np.asarray(batch.column(ITEM_ID).fill_null("").to_numpy(zero_copy_only=False), object)
            out.append(ids[np.isin(pd.util.hash_array(ids), hashes)])
    return np.concatenate(out) if out else np.zeros(0, object)


def prepare_fingerprint(src: ItemsSource) -> str | None:
    """The prepare stage's fingerprint when the input is items.parquet of a `llmrec prepare` folder."""
    if len(src.files) != 1 or not src.files[0].endswith("/" + ITEMS_FILE):
        return None
    meta_path = src.files[0].rsplit("/", 1)[0] + "/" + META_FILE
    try:
        with open_input(src.fs, meta_path) as f:
            meta = json.loads(f.read())
    except (OSError, json.JSONDecodeError):
        return None
    if meta.get("stage") != "prepare":
        return None
    fp = meta.get("dataset_fingerprint") or meta.get("fingerprint")
    return str(fp) if fp else None


def pinned(node_id: str) -> dict[str, Any]:
    """Ray remote args that keep a task on `node_id` (the driver's node, which has the local files)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)}
