"""Embeddings artifact -> index artifact (`llmrec index`), and in-place additions to an index artifact.

The options (kind, recall sample, device, kind parameters) are the fields of `llmrec.config.IndexConfig`.

`build_index` streams the embeddings folder in chunks (`llmrec.embed.artifact.iter_embeddings`) into
`ItemIndex.build_from_batches`: kinds that train read it twice (a seeded sample, then the adds), so the
whole matrix is never in memory beside a compressed index. Approximate kinds always measure recall@10
against exact search on `sample` catalog items (each query item dropped from both lists, it would find
itself trivially); `check=True` measures the exact kinds too. The figure lands in meta.json as
`recall_at_10` (with `recall_queries`, `recall_at_10_n_items`).

`add_to_index` loads an index folder, checks that another embeddings artifact comes from the same encoder
(model_name, dim), adds its items chunk by chunk (IVF/PQ kinds encode them with the trained quantizer, no
retraining) and rewrites the folder; the meta records every addition under `added`.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np

from llmrec.artifacts import read_meta
from llmrec.config import IndexConfig, with_overrides
from llmrec.embed.artifact import iter_embeddings
from llmrec.index.item_index import ItemIndex

logger = logging.getLogger(__name__)

__all__ = ["add_to_index", "build_index"]


def build_index(
    embeddings_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: IndexConfig | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Build and save an index over an embeddings artifact, streaming it in chunks.

    Args:
        embeddings_dir: folder written by `llmrec embed` (read through `iter_embeddings`).
        out_dir: index folder to write (index.faiss | index.npy, item_ids.npy, meta.json).
        config: the options (kind, check, sample, device, batch_rows and the kind parameters M, nlist,
            nprobe, ...; documented in `llmrec.config.IndexConfig`); None = `IndexConfig()`.
        **options: IndexConfig fields that replace those of `config`, for keyword callers
            (`build_index(emb, out, kind="IVF32,SQ8", nprobe=1)`).

    Returns:
        the index meta.json written (kind, dim, metric, n_items, embed, params, build_s, index_bytes,
        [factory, recall_at_10, recall_queries, recall_at_10_n_items, train_size, tuning]).

    Raises:
        ValueError: an unknown or out-of-range option, or a kind parameter the kind has not.
    """
    cfg = with_overrides(config if config is not None else IndexConfig(), options, "build_index")
    embed_meta = read_meta(embeddings_dir, "embed")
    idx = ItemIndex.build_from_batches(
        lambda: iter_embeddings(embeddings_dir, batch_rows=cfg.batch_rows),  # a fresh pass per call
        n_items=int(embed_meta["n_items"]),
        dim=int(embed_meta["dim"]),
        kind=cfg.kind,
        device=cfg.device,
        normalize=False,
        embed_meta=embed_meta,
        recall_sample=cfg.sample,
        check=cfg.check,
        **cfg.params(),
    )
    stats = idx.build_stats
    meta = idx.save(out_dir, embed_meta, embeddings_dir=os.fspath(embeddings_dir))
    logger.info(
        "indexed %d items (%s, dim %d) into %s in %.1fs%s",
        idx.n_items,
        idx.kind,
        idx.dim,
        out_dir,
        stats["build_s"],
        f", recall@10 {stats['recall_at_10']:.4f} vs exact" if "recall_at_10" in stats else "",
    )
    return meta


def add_to_index(
    index_dir: str | os.PathLike,
    embeddings_dir: str | os.PathLike,
    config: IndexConfig | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Add the items of another embeddings artifact to an existing index folder, in place.

    Args:
        index_dir: folder written by `build_index` / `ItemIndex.save`; rewritten with the new items.
        embeddings_dir: embeddings artifact from the same encoder (model_name and dim must match).
        config: the options; this reads `skip_existing` (leave out items already in the index, counted and
            logged, instead of refusing), `device` and `batch_rows` (the index keeps its kind and
            parameters). None = `IndexConfig()`.
        **options: IndexConfig fields that replace those of `config` (`skip_existing=True`).

    Returns:
        the rewritten index meta.json (n_items updated; `added` lists each addition).

    Raises:
        ArtifactError / ValueError: another encoder, or ids already indexed without `skip_existing`.
    """
    cfg = with_overrides(config if config is not None else IndexConfig(), options, "add_to_index")
    skip_existing, device, batch_rows = cfg.skip_existing, cfg.device, cfg.batch_rows
    embed_meta = read_meta(embeddings_dir, "embed")
    idx = ItemIndex.load(index_dir, expect_embed_meta=embed_meta, device=device)
    old_meta = read_meta(index_dir, "index")
    n_present, examples, n_total = 0, [], 0
    for ids, _ in iter_embeddings(embeddings_dir, batch_rows=batch_rows):  # refuse before changing anything
        present = [i for i in ids if i in idx]
        n_present += len(present)
        examples += present[: 5 - len(examples)]
        n_total += len(ids)
    if n_present and not skip_existing:
        raise ValueError(
            f"{n_present} of {n_total} items in {embeddings_dir} are already in the index "
            f"{index_dir}, e.g. {examples}; pass --skip-existing to add only new ones"
        )
    if n_present:
        logger.info("skipping %d of %d items already in the index", n_present, n_total)
    n_before = idx.n_items
    t0 = time.perf_counter()
    for ids, vectors in iter_embeddings(embeddings_dir, batch_rows=batch_rows):
        new = np.array([i not in idx for i in ids], dtype=bool)
        idx.add(list(ids[new]), vectors[new])
    add_s = time.perf_counter() - t0
    n_added = idx.n_items - n_before
    added = list(old_meta.get("added", [])) + [
        {
            "embeddings_dir": os.fspath(embeddings_dir),
            "n_added": int(n_added),
            "n_skipped": int(n_present),
            "dataset_fingerprint": embed_meta.get("dataset_fingerprint"),
            "add_s": round(add_s, 3),
        }
    ]
    keep = {k: v for k, v in old_meta.items() if k not in _OWN_META_KEYS}  # build_s, recall_at_10[_n_items]
    meta = idx.save(index_dir, idx.embed_meta, **{**keep, "added": added})
    logger.info("added %d items to %s (%d -> %d) in %.2fs", n_added, index_dir, n_before, idx.n_items, add_s)
    return meta


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
    "index_bytes",
    "factory",
)
