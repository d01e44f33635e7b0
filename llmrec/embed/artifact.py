"""Read an `llmrec embed` artifact folder: `load_embeddings(dir) -> Embeddings`.

The folder holds `embeddings.parquet` (`item_id` string, `embedding` fixed_size_list<float32>[D]) in the row
order of the items table it was built from, and a `meta.json` of stage "embed" (model_name, dim, n_items,
...).
The loader checks the file against the meta (row count, dim, dtype) so a stale or truncated file fails here
with one clear line, not later inside an index. `iter_embeddings(dir)` streams the same data in chunks (for
the index stage, which never needs the whole matrix at once).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmrec.artifacts import ArtifactError, read_meta
from llmrec.schema import EMBEDDING, EMBEDDINGS_FILE, ITEM_ID

logger = logging.getLogger(__name__)

__all__ = ["Embeddings", "iter_embeddings", "load_embeddings"]


@dataclass(frozen=True)
class Embeddings:
    """Item vectors in items-table order.

    Attributes:
        item_ids: object array (N,) of str.
        vectors: float32 array (N, D), L2-normalised rows when `meta["normalized"]`.
        meta: the artifact's meta.json (model_name, dim, n_items, ...).
    """

    item_ids: np.ndarray
    vectors: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def __len__(self) -> int:
        return int(self.item_ids.shape[0])


def load_embeddings(art_dir: str | os.PathLike) -> Embeddings:
    """Load `art_dir/embeddings.parquet`, checked against `art_dir/meta.json`.

    Returns:
        Embeddings with item_ids (N,) object and vectors float32 (N, D).

    Raises:
        ArtifactError (a ValueError): no meta / wrong stage / missing file / rows or dim differ from meta.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    t0 = time.perf_counter()
    meta = read_meta(art_dir, "embed")
    path = Path(art_dir) / EMBEDDINGS_FILE
    if not path.is_file():
        raise ArtifactError(
            f"{art_dir} has an embed meta.json but no {EMBEDDINGS_FILE}; re-run `llmrec embed`"
        )
    table = pq.read_table(path)
    for col in (ITEM_ID, EMBEDDING):
        if col not in table.column_names:
            raise ArtifactError(
                f"{path} lacks column {col!r} (has {table.column_names}); re-run `llmrec embed`"
            )
    emb = table.column(EMBEDDING).combine_chunks()
    if not pa.types.is_fixed_size_list(emb.type):
        raise ArtifactError(
            f"{path}: {EMBEDDING!r} must be fixed_size_list<float32>, got {emb.type}; re-run `llmrec embed`"
        )
    dim = emb.type.list_size
    n = table.num_rows
    if dim != meta.get("dim") or n != meta.get("n_items"):
        raise ArtifactError(
            f"{path} holds {n} rows of dim {dim}, its meta.json says n_items={meta.get('n_items')} "
            f"dim={meta.get('dim')}; the folder is stale or truncated, re-run `llmrec embed`"
        )
    vectors = np.asarray(emb.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(n, dim)
    item_ids = np.asarray(table.column(ITEM_ID).to_numpy(zero_copy_only=False), dtype=object)
    logger.info(
        "loaded %d x %d embeddings (%s) in %.2fs", n, dim, meta.get("model_name"), time.perf_counter() - t0
    )
    return Embeddings(item_ids=item_ids, vectors=vectors, meta=meta)


def iter_embeddings(
    art_dir: str | os.PathLike, batch_rows: int = 65_536
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Stream (item_ids object (M,), vectors float32 (M, D)) batches in row order, at most `batch_rows` each.

    Holds one batch (plus the reader's buffer) at a time; call it again for another pass. Item identity is
    carried by the ids, never by the row position. Checks columns, dim and nulls as it goes, and the total
    row count against meta.json at the end of the pass.

    Example::

        for item_ids, vectors in iter_embeddings("runs/ml/embeddings"):  # (M,) object, (M, D) float32
            ...

    Raises:
        ArtifactError (a ValueError): no meta / wrong stage / missing file / a column, dim or row count
            that differs from meta.json.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if batch_rows < 1:
        raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
    meta = read_meta(art_dir, "embed")
    dim, n_meta = meta.get("dim"), meta.get("n_items")
    path = Path(art_dir) / EMBEDDINGS_FILE
    if not path.is_file():
        raise ArtifactError(
            f"{art_dir} has an embed meta.json but no {EMBEDDINGS_FILE}; re-run `llmrec embed`"
        )
    # pre_buffer (pyarrow's default) keeps every column chunk it has read: the whole file by the end of a
    # pass (1.5 GB at 1M x 384); a plain buffered stream holds one batch
    pf = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 22)
    missing = [c for c in (ITEM_ID, EMBEDDING) if c not in pf.schema_arrow.names]
    if missing:
        raise ArtifactError(
            f"{path} lacks column(s) {missing} (has {pf.schema_arrow.names}); re-run `llmrec embed`"
        )
    n = 0
    for batch in pf.iter_batches(batch_size=batch_rows, columns=[ITEM_ID, EMBEDDING]):
        emb = batch.column(EMBEDDING)
        if not pa.types.is_fixed_size_list(emb.type) or emb.type.list_size != dim or emb.null_count:
            raise ArtifactError(
                f"{path}: {EMBEDDING!r} must be non-null fixed_size_list<float32>[{dim}] (meta.json dim), "
                f"got {emb.type} with {emb.null_count} nulls; re-run `llmrec embed`"
            )
        m = batch.num_rows
        vectors = np.asarray(emb.flatten().to_numpy(zero_copy_only=False), np.float32).reshape(m, -1)
        ids = np.asarray(batch.column(ITEM_ID).to_numpy(zero_copy_only=False), dtype=object)
        n += m
        yield ids, vectors
    if n != n_meta:
        raise ArtifactError(
            f"{path} holds {n} rows, its meta.json says n_items={n_meta}; the folder is stale or truncated, "
            f"re-run `llmrec embed`"
        )
