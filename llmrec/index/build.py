"""Embeddings artifact -> index artifact (`llmrec index`), and in-place additions to an index artifact.

`build_index` reads the embeddings folder (`llmrec.embed.artifact.load_embeddings`: the sharded part files or
the single file of older runs), builds an `ItemIndex`, saves it, and with `check=True` measures
recall@10 against exact search: `sample` catalog items are the queries, and each query item itself is
dropped from both result lists (it would find itself trivially and inflate the figure).

`add_to_index` loads an index folder, checks that another embeddings artifact comes from the same encoder
(model_name, dim), adds its items and rewrites the folder; the meta records every addition under `added`.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np

from llmrec.artifacts import read_meta
from llmrec.index.item_index import ItemIndex, exact_topk, recall_at_k

logger = logging.getLogger(__name__)

__all__ = ["add_to_index", "build_index", "check_recall"]


def build_index(
    embeddings_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    kind: str = "auto",
    check: bool = False,
    sample: int = 1000,
    device: str = "auto",
    **params: Any,
) -> dict[str, Any]:
    """Build and save an index over an embeddings artifact.

    Args:
        embeddings_dir: folder written by `llmrec embed` (part files or embeddings.parquet, + meta.json).
        out_dir: index folder to write (index.faiss | index.npy, item_ids.npy, meta.json).
        kind: "auto" | "flat" | "hnsw" | "ivf" | "torch" (see `ItemIndex.build`).
        check: measure recall@10 vs exact search on `sample` catalog items; stored as `recall_at_10`.
        sample: number of catalog items used as queries by `check`.
        device: "auto" | "cpu" | "cuda[:i]".
        **params: kind parameters passed to `ItemIndex.build`.

    Returns:
        the index meta.json written (kind, dim, metric, n_items, embed, params, build_s[, recall_at_10]).
    """
    if sample < 1:
        raise ValueError(f"sample must be >= 1 catalog items, got {sample}")
    ids, vectors, embed_meta = _read_embeddings(embeddings_dir)
    t0 = time.perf_counter()
    idx = ItemIndex.build(
        vectors,
        ids,
        kind=kind,
        device=device,
        normalize=False,  # type: ignore[arg-type]
        embed_meta=embed_meta,
        **params,
    )
    build_s = time.perf_counter() - t0
    extra: dict[str, Any] = {"build_s": round(build_s, 3), "embeddings_dir": os.fspath(embeddings_dir)}
    if check:
        rec, n_q = check_recall(idx, sample=sample)
        extra.update(recall_at_10=round(rec, 4), recall_queries=n_q, recall_at_10_n_items=idx.n_items)
        logger.info("recall@10 of the %s index vs exact search on %d catalog items: %.4f", idx.kind, n_q, rec)
    meta = idx.save(out_dir, embed_meta, **extra)
    logger.info(
        "indexed %d items (%s, dim %d) into %s in %.1fs", idx.n_items, idx.kind, idx.dim, out_dir, build_s
    )
    return meta


def add_to_index(
    index_dir: str | os.PathLike,
    embeddings_dir: str | os.PathLike,
    skip_existing: bool = False,
    device: str = "auto",
) -> dict[str, Any]:
    """Add the items of another embeddings artifact to an existing index folder, in place.

    Args:
        index_dir: folder written by `build_index` / `ItemIndex.save`; rewritten with the new items.
        embeddings_dir: embeddings artifact from the same encoder (model_name and dim must match).
        skip_existing: leave out items already in the index (counted and logged) instead of refusing.
        device: "auto" | "cpu" | "cuda[:i]".

    Returns:
        the rewritten index meta.json (n_items updated; `added` lists each addition).

    Raises:
        ArtifactError / ValueError: another encoder, or ids already indexed without `skip_existing`.
    """
    ids, vectors, embed_meta = _read_embeddings(embeddings_dir)
    idx = ItemIndex.load(index_dir, expect_embed_meta=embed_meta, device=device)
    old_meta = read_meta(index_dir, "index")
    present = np.array([i in idx for i in ids], dtype=bool)
    if present.any() and not skip_existing:
        raise ValueError(
            f"{int(present.sum())} of {len(ids)} items in {embeddings_dir} are already in the index "
            f"{index_dir}, e.g. {list(ids[present][:5])}; pass --skip-existing to add only new ones"
        )
    if present.any():
        logger.info("skipping %d of %d items already in the index", int(present.sum()), len(ids))
    new_ids, new_vecs = ids[~present], vectors[~present]
    n_before = idx.n_items
    t0 = time.perf_counter()
    idx.add(list(new_ids), new_vecs)
    add_s = time.perf_counter() - t0
    added = list(old_meta.get("added", [])) + [
        {
            "embeddings_dir": os.fspath(embeddings_dir),
            "n_added": int(len(new_ids)),
            "n_skipped": int(present.sum()),
            "dataset_fingerprint": embed_meta.get("dataset_fingerprint"),
            "add_s": round(add_s, 3),
        }
    ]
    keep = {k: v for k, v in old_meta.items() if k not in _OWN_META_KEYS}  # build_s, recall_at_10[_n_items]
    meta = idx.save(index_dir, idx.embed_meta, **{**keep, "added": added})
    logger.info(
        "added %d items to %s (%d -> %d) in %.2fs", len(new_ids), index_dir, n_before, idx.n_items, add_s
    )
    return meta


def check_recall(index: ItemIndex, sample: int = 1000, k: int = 10, seed: int = 0) -> tuple[float, int]:
    """recall@k of `index.search` vs exact search, with `sample` catalog items as queries (self excluded).

    Returns:
        (recall in [0, 1], number of queries used).
    """
    n = index.n_items
    rows = np.random.default_rng(seed).choice(n, size=min(sample, n), replace=False)
    xq = index.vectors[rows]  # (S, D)
    _, exact = exact_topk(index.vectors, xq, k + 1)  # (S, k+1) rows
    self_ids = index.item_ids[rows]
    _, got_ids = index.search(xq, k, exclude=[[i] for i in self_ids])  # (S, k) ids, self left out
    got = np.array([[index.position(i) if i else -1 for i in row] for row in got_ids], dtype=np.int64)
    return recall_at_k(got, exact, k, self_pos=rows), len(rows)


_OWN_META_KEYS = (
    "schema_version",
    "stage",
    "created_at",
    "code_version",
    "kind",
    "dim",
    "metric",
    "n_items",
    "embed",
    "params",
    "added",
)


def _read_embeddings(art_dir: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(item_ids object (N,), vectors float32 (N, D), embed meta) of an embeddings folder (either layout)."""
    from llmrec.embed.artifact import load_embeddings

    emb = load_embeddings(art_dir)
    return np.asarray(emb.item_ids, dtype=object), np.asarray(emb.vectors, dtype=np.float32), dict(emb.meta)
