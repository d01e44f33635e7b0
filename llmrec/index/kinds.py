"""Index kinds: the named ones, FAISS `index_factory` strings, and what "auto" picks for a catalog size.

A kind is one of `NAMED_KINDS` or any FAISS `index_factory` string that builds a float index searchable by
inner product (`"IVF4096,PQ48"`, `"HNSW32,SQ8"`, `"IVF1024,Flat"`, `"OPQ48,IVF4096,PQ48"`, ...).

"auto" (`auto_kind`, a pure function of the catalog size so it is tested without building big indexes):
- on the CPU: exact "flat" below `AUTO_FLAT_MAX_ITEMS`, "hnsw" up to `AUTO_COMPRESSED_MIN_ITEMS`, and a
  compressed IVF (`auto_ivf_factory`) from there on, where a float32 graph index no longer fits comfortably
  in one host's memory (HNSW32 costs 4 * D + ~256 bytes per item: ~164 GB at 100M x 384).
- on CUDA below `AUTO_COMPRESSED_MIN_ITEMS`: faiss GPU "flat" when faiss sees a GPU, else the torch kind.
- `auto_ivf_factory(n, d)` = `IVF{nlist},SQ8`: nlist the power of two nearest 4 * sqrt(n) (faiss's guide
  says 4..16 * sqrt(n)), with at least 39 items per list; SQ8 (one byte per dimension, 4x smaller than
  float32) rather than PQ{d//8} (d/8 bytes, 32x smaller) because at 1M x 384 PQ48 loses too much recall
  for a retrieval stage that feeds a re-ranker; see benchmarks/README.md ("Index at 1M") for the figures.
"""

from __future__ import annotations

import math
import re
from typing import Any

__all__ = [
    "AUTO_COMPRESSED_MIN_ITEMS",
    "AUTO_FLAT_MAX_ITEMS",
    "FACTORY_EXAMPLES",
    "NAMED_KINDS",
    "auto_ivf_factory",
    "auto_kind",
    "auto_nlist",
    "faiss_error_reason",
    "check_factory",
    "is_named",
]

NAMED_KINDS = ("auto", "flat", "hnsw", "ivf", "torch")
AUTO_FLAT_MAX_ITEMS = 50_000  # "auto" picks exact flat search below this many items
AUTO_COMPRESSED_MIN_ITEMS = 1_000_000  # ... HNSW below this, a compressed IVF from here on
FACTORY_EXAMPLES = ("IVF4096,SQ8", "IVF4096,PQ48", "HNSW32,SQ8", "IVF1024,Flat", "OPQ48,IVF4096,PQ48")


def is_named(kind: str) -> bool:
    """True for "auto" | "flat" | "hnsw" | "ivf" | "torch"; anything else is read as a factory string."""
    return kind in NAMED_KINDS


def auto_nlist(n_items: int) -> int:
    """IVF list count for `n_items`: the power of two nearest 4 * sqrt(n), at most n // 39, at least 1."""
    if n_items < 1:
        raise ValueError(f"n_items must be >= 1, got {n_items}")
    target = 4.0 * math.sqrt(n_items)
    nlist = 2 ** round(math.log2(target))
    while nlist > 1 and nlist * 39 > n_items:  # faiss k-means wants >= 39 training points per centroid
        nlist //= 2
    return int(nlist)


def auto_ivf_factory(n_items: int, dim: int) -> str:
    """The compressed kind "auto" builds for big catalogs: `IVF{auto_nlist(n)},SQ8`."""
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    return f"IVF{auto_nlist(n_items)},SQ8"


def auto_kind(
    n_items: int, dim: int, *, on_cuda: bool = False, faiss_gpu: bool = False, has_faiss: bool = True
) -> str:
    """The kind "auto" resolves to (see the module docstring); pure, so it is cheap to test at any size.

    Args:
        n_items: catalog size N.
        dim: vector dimension D.
        on_cuda: the index is to be searched on a CUDA device.
        faiss_gpu: faiss sees a GPU (faiss-gpu installed and a device present).
        has_faiss: faiss is importable; without it every size gets the exact torch kind.

    Returns:
        "flat" | "hnsw" | "torch" | a factory string such as "IVF4096,SQ8".
    """
    if not has_faiss:
        return "torch"
    if n_items >= AUTO_COMPRESSED_MIN_ITEMS:
        return auto_ivf_factory(n_items, dim)
    if on_cuda:
        return "flat" if faiss_gpu else "torch"
    return "flat" if n_items < AUTO_FLAT_MAX_ITEMS else "hnsw"


def faiss_error_reason(e: BaseException) -> str:
    """The first non-empty line of a faiss RuntimeError (the rest is a C++ stack), at most 200 characters."""
    return next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)[:200]


def check_factory(spec: str, dim: int) -> Any:
    """Build the empty faiss index of factory string `spec` for `dim`, or raise a ValueError that says why.

    Returns:
        the (untrained, empty) CPU faiss index, inner-product metric.

    Raises:
        ValueError: faiss cannot parse `spec`; it wraps ids (IDMap: this index numbers items itself); or the
            index does not search by inner product.
    """
    import faiss

    valid = (
        f"named kinds {NAMED_KINDS[1:]} or a FAISS index_factory string, e.g. {', '.join(FACTORY_EXAMPLES)}"
    )
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"index kind must be one of {valid}; got {spec!r}")
    if re.search(r"(^|,)\s*IDMap", spec):
        raise ValueError(
            f"index kind {spec!r}: IDMap is not allowed (the index numbers items itself and keeps "
            f"their ids); drop the 'IDMap,' prefix"
        )
    try:
        index = faiss.index_factory(int(dim), spec, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ValueError(
            f"index kind {spec!r} is not a FAISS index_factory string faiss can build for dim {dim} "
            f"({faiss_error_reason(e)}); use one of {valid}"
        ) from None
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise ValueError(
            f"index kind {spec!r} builds a {type(index).__name__} that ignores the inner-product metric; "
            f"use one of {valid}"
        )
    return index
