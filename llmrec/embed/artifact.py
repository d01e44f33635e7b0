"""Read an `llmrec embed` artifact folder: `load_embeddings(dir)`, `iter_embeddings`, `read_item_ids`.

Two layouts, both read by every function here:
- sharded (what `llmrec embed` writes): `part-<write id>-<NNNNNN>.parquet` files, each with `item_id` string
  and `embedding` fixed_size_list<float32>[D]. meta.json's `parts_prefix` ("part-<write id>-") names the files
  of the current version and `n_parts` their number; part files with another prefix (a failed or superseded
  write) are ignored.
- single file (folders written before the sharded layout): `embeddings.parquet`, same columns.

Row order, the item order every consumer gets (index, scorer, evaluation, serving): the part files in name
order, rows in file order. `llmrec embed` makes that the order of the items table it read (its input files in
name order, rows in file order), as the single-file layout always was. Consumers still match items by
`item_id` (the scorer and the index store their own id arrays), never by row position across artifacts.

Every reader checks the files against meta.json (rows, dim, dtype, nulls), so a stale or truncated folder
fails here with one clear line, not later inside an index. `iter_embeddings` streams the vectors part by part
(memory: one part), for consumers that must not hold the whole matrix.
Tests: tests/test_ray_embed.py.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

from llmrec.artifacts import ArtifactError, read_meta
from llmrec.protocol import ItemSpace
from llmrec.schema import EMBEDDING, EMBEDDINGS_FILE, FACETS, ITEM_ID

logger = logging.getLogger(__name__)

__all__ = [
    "Embeddings",
    "load_embeddings",
    "load_item_space",
    "iter_embeddings",
    "read_item_ids",
    "embedding_files",
    "text_model_of",
]


@dataclass(frozen=True)
class Embeddings:
    """Item vectors in the artifact's row order (module docstring).

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


def embedding_files(art_dir: str | os.PathLike, meta: dict[str, Any] | None = None) -> list[Path]:
    """The parquet files of an embeddings folder, in row order (sharded parts, or the one legacy file).

    Raises:
        ArtifactError: meta.json missing or not an embed artifact, or files missing / fewer than meta says.
    """
    d = Path(art_dir)
    meta = read_meta(d, "embed") if meta is None else meta
    prefix = meta.get("parts_prefix")
    if prefix:
        files = sorted(p for p in d.glob(f"{prefix}*.parquet") if p.is_file())
        if len(files) != meta.get("n_parts", len(files)) or not files:
            raise ArtifactError(
                f"{d}: meta.json names {meta.get('n_parts')} part file(s) {prefix}*.parquet, found "
                f"{len(files)}; the folder is incomplete or was changed, re-run `llmrec embed`"
            )
        return files
    path = d / EMBEDDINGS_FILE
    if not path.is_file():
        raise ArtifactError(f"{d} has an embed meta.json but no {EMBEDDINGS_FILE}; re-run `llmrec embed`")
    return [path]


def iter_embeddings(
    art_dir: str | os.PathLike, batch_rows: int = 65536, meta: dict[str, Any] | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Stream (item_ids object (B,), vectors float32 (B, D)) batches in row order, at most `batch_rows` each.

    Checks every file's columns, dim and nulls as it goes, and the total row count against meta.json
    (`meta`: the folder's meta.json when the caller has read it already).

    Raises:
        ArtifactError: as `load_embeddings`.
    """
    import pyarrow.parquet as pq

    d = Path(art_dir)
    meta = read_meta(d, "embed") if meta is None else meta
    dim, n_meta = meta.get("dim"), meta.get("n_items")
    n = 0
    for path in embedding_files(d, meta):
        # pre_buffer (pyarrow's default) keeps every column chunk it has read: the whole file by the end of
        # a pass (1.5 GB at 1M x 384); a plain buffered stream holds one batch
        f = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 22)
        _check_schema(path, f.schema_arrow, dim, meta)
        for batch in f.iter_batches(batch_size=batch_rows, columns=[ITEM_ID, EMBEDDING]):
            ids, vecs = _arrays(path, batch, dim)
            n += len(ids)
            yield ids, vecs
    if n != n_meta:
        raise ArtifactError(
            f"{d} holds {n} rows of dim {dim}, its meta.json says n_items={n_meta} dim={dim}; "
            "the folder is stale or truncated, re-run `llmrec embed`"
        )


def read_item_ids(art_dir: str | os.PathLike) -> np.ndarray:
    """The item ids (object (N,) of str) in row order, reading only the `item_id` column."""
    import pyarrow.parquet as pq

    d = Path(art_dir)
    meta = read_meta(d, "embed")
    parts = []
    for path in embedding_files(d, meta):
        t = pq.read_table(path, columns=[ITEM_ID])
        parts.append(np.asarray(t.column(ITEM_ID).to_numpy(zero_copy_only=False), dtype=object))
    ids = np.concatenate(parts) if parts else np.zeros((0,), object)
    if len(ids) != meta.get("n_items"):
        raise ArtifactError(
            f"{d} holds {len(ids)} item ids, its meta.json says n_items={meta.get('n_items')}; "
            "the folder is stale or truncated, re-run `llmrec embed`"
        )
    return ids


def load_embeddings(art_dir: str | os.PathLike) -> Embeddings:
    """Load every vector of an embeddings folder (either layout), checked against its meta.json.

    Returns:
        Embeddings with item_ids (N,) object and vectors float32 (N, D), rows in the artifact's order (module
        docstring). Memory: the (N, D) matrix plus one part file at a time.

    Raises:
        ArtifactError (a ValueError): no meta / wrong stage / missing files / columns, rows or dim differ from
            meta.

    Example::

        emb = load_embeddings("run/embeddings")
        scores = emb.vectors @ emb.vectors[0]   # (N,) cosine to the first item
    """
    t0 = time.perf_counter()
    d = Path(art_dir)
    meta = read_meta(d, "embed")
    n, dim = meta.get("n_items"), meta.get("dim")
    if not isinstance(n, int) or not isinstance(dim, int):
        raise ArtifactError(f"{d}/meta.json lacks integer n_items and dim; re-run `llmrec embed`")
    vectors = np.empty((n, dim), np.float32)  # filled part by part: no second copy of the matrix
    ids: list[np.ndarray] = []
    row = 0
    for batch_ids, batch_vecs in _iter_checked(d, meta, n):
        vectors[row : row + len(batch_ids)] = batch_vecs
        ids.append(batch_ids)
        row += len(batch_ids)
    item_ids = np.concatenate(ids) if ids else np.zeros((0,), object)
    logger.info(
        "loaded %d x %d embeddings (%s) in %.2fs", n, dim, meta.get("model_name"), time.perf_counter() - t0
    )
    return Embeddings(item_ids=item_ids, vectors=vectors, meta=meta)


# ---------------------------------------------------------------------------------------------- helpers


def _iter_checked(d: Path, meta: dict[str, Any], n: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """iter_embeddings, but refusing more rows than meta's n_items before they overflow the matrix."""
    seen = 0
    for ids, vecs in iter_embeddings(d, batch_rows=1 << 18, meta=meta):
        seen += len(ids)
        if seen > n:
            raise ArtifactError(
                f"{d} holds more than {seen - len(ids)} rows of dim {meta.get('dim')}, its meta.json says "
                f"n_items={n} dim={meta.get('dim')}; the folder is stale or truncated, re-run `llmrec embed`"
            )
        yield ids, vecs


def _check_schema(path: Path, schema: Any, dim: Any, meta: dict[str, Any]) -> None:
    import pyarrow as pa

    for col in (ITEM_ID, EMBEDDING):
        if col not in schema.names:
            raise ArtifactError(f"{path} lacks column {col!r} (has {schema.names}); re-run `llmrec embed`")
    t = schema.field(EMBEDDING).type
    if not pa.types.is_fixed_size_list(t):
        raise ArtifactError(
            f"{path}: {EMBEDDING!r} must be fixed_size_list<float32>, got {t}; re-run `llmrec embed`"
        )
    if t.list_size != dim:
        raise ArtifactError(
            f"{path} holds vectors of dim {t.list_size}, its meta.json says n_items={meta.get('n_items')} "
            f"dim={dim}; the folder is stale or truncated, re-run `llmrec embed`"
        )


def _arrays(path: Path, batch: Any, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids object (B,), vectors float32 (B, D)) of one record batch; nulls refused."""
    emb = batch.column(EMBEDDING)
    id_col = batch.column(ITEM_ID)
    if emb.null_count or id_col.null_count:
        raise ArtifactError(
            f"{path}: {emb.null_count} null embedding(s), {id_col.null_count} null item id(s); "
            "re-run `llmrec embed`"
        )
    vecs = np.asarray(emb.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, dim)
    ids = np.asarray(id_col.to_numpy(zero_copy_only=False), dtype=object)
    return ids, vecs


def load_item_space(
    embeddings_dir: str | os.PathLike, items: pd.DataFrame | None = None
) -> tuple[ItemSpace, dict]:
    """ItemSpace from an embed folder (rows in embeddings order) with titles and facets from `items` (the
    prepared items table) when given; also the folder's meta."""
    emb = load_embeddings(embeddings_dir)
    ids, vecs, meta = emb.item_ids, emb.vectors, emb.meta
    if len(set(ids)) != len(ids):
        raise ValueError(f"{embeddings_dir}: duplicate item ids in the embeddings; re-run `llmrec embed`")
    titles = facets = None
    if items is not None and "title" in items.columns:
        t = items.set_index(ITEM_ID)["title"]
        titles = t.reindex(ids).fillna("").astype(str).to_numpy(dtype=object)
    if items is not None and FACETS in items.columns:
        by_id = dict(zip(items[ITEM_ID].astype(str), items[FACETS], strict=True))
        facets = [list(by_id.get(str(i), [])) for i in ids]
    return ItemSpace(
        item_ids=np.asarray(ids, dtype=object),
        text_vectors=np.asarray(vecs, np.float32),
        titles=titles,
        facets=facets,
        text_model=text_model_of(meta),
    ), dict(meta)


def text_model_of(embed_meta: dict) -> str | None:
    """The encoder of an embeddings artifact as a concrete folder or hub name (the bundled MiniLM's folder for
    the default model), or None when the meta does not say (texts then cannot be encoded into its space)."""
    from llmrec.embed.encoder import DEFAULT_MODEL_NAME, default_model_path, model_for_meta  # torch: lazily

    model = model_for_meta(embed_meta)
    if model is None and embed_meta.get("model_name") == DEFAULT_MODEL_NAME:
        model = default_model_path()
    return model
