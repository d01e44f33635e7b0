"""Read an `llmrec embed` artifact folder: `load_embeddings(dir) -> Embeddings`.

The folder holds `embeddings.parquet` (`item_id` string, `embedding` fixed_size_list<float32>[D]) in the row
order of the items table it was built from, and a `meta.json` of stage "embed" (model_name, dim, n_items,
...).
The loader checks the file against the meta (row count, dim, dtype) so a stale or truncated file fails here
with one clear line, not later inside an index.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmrec.artifacts import ArtifactError, read_meta
from llmrec.schema import EMBEDDING, EMBEDDINGS_FILE, ITEM_ID

logger = logging.getLogger(__name__)

__all__ = ["Embeddings", "load_embeddings"]


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
