"""Item facets: the categorical labels of an item that a user could name in feedback.

`schema.FACETS` ("facets") is an optional column of `items.parquet` (every `llmrec prepare` adapter writes
it; data folders prepared before it existed lack it). Its one form everywhere, on disk and in memory:

- parquet: `list<string>`, never null; an item without labels has `[]`.
- pandas (`llmrec.data.tables.read_items`): one Python `list[str]` per row (not the numpy arrays a plain
  pyarrow round trip gives), each label stripped, non-empty, unique within the item, in source order.

What each dataset's facets are (the adapters fill them): MovieLens genres; Magazine the metadata category
list minus the top "Magazine Subscriptions"; Scientific the whole category path as one label; MIND
[category, subcategory]; generic `--facet-cols` (see `labels_from_column`).

This module is the one home for reading facets: `item_facets(items)` gives the lists, `facet_matrix` the
item x facet incidence matrix. Tests: tests/test_facets.py, tests/test_prepare.py.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from llmrec.schema import FACETS

if TYPE_CHECKING:
    import scipy.sparse

__all__ = [
    "SPLIT_CHARS",
    "clean_labels",
    "facet_matrix",
    "facet_stats",
    "item_facets",
    "labels_from_column",
    "to_facet_lists",
]

# A string-valued facet column is split on either of these; never on "," (real labels hold commas:
# "Arts, Music & Photography", "Sports, Recreation & Outdoors").
SPLIT_CHARS = "|;"
_SPLIT = re.compile(r"[|;]")
_FIX = "re-run `llmrec prepare` to write the canonical facets column"


def clean_labels(labels: Iterable[str]) -> list[str]:
    """Labels stripped, empty ones dropped, duplicates dropped (first occurrence kept, order kept)."""
    out: list[str] = []
    seen: set[str] = set()
    for lab in labels:
        s = lab.strip()
        if s and s not in seen:
            seen.add(s)
            out.append(s)
    return out


def labels_from_column(values: Sequence[object], column: str) -> list[list[str]]:
    """Facet lists from one raw column of a generic catalog (`llmrec prepare --facet-cols`).

    A list / tuple / array value is taken as is (each element must be a string; no splitting); a string
    value is split on "|" and on ";" (never on ","); null is `[]`. Every list then goes through
    `clean_labels`.

    Raises:
        ValueError: a value (or a list element) that is neither a string nor null, naming the column, the row
            and the type.
    """
    out: list[list[str]] = []
    for row, v in enumerate(values):
        if _is_null(v):
            out.append([])
        elif isinstance(v, str):
            out.append(clean_labels(_SPLIT.split(v)))
        elif isinstance(v, list | tuple | np.ndarray):
            out.append(clean_labels(_strings(v, column, row)))
        else:
            raise ValueError(
                f"facet column {column!r}, row {row}: got {v!r} ({type(v).__name__}), expected a string "
                f"(labels separated by '|' or ';') or a list of strings; cast the column to string or "
                f"leave it out of --facet-cols"
            )
    return out


def to_facet_lists(values: Sequence[object], where: str = FACETS) -> list[list[str]]:
    """Check a facets column and return it in the canonical form (one `list[str]` per row, cleaned).

    Accepts per row a list / tuple / numpy array of strings (what adapters build, or what a parquet round trip
    gives) or null (no labels: `[]`).

    Raises:
        ValueError: a row is a bare string or another type, or holds a non-string element.
    """
    out: list[list[str]] = []
    for row, v in enumerate(values):
        if _is_null(v):
            out.append([])
        elif isinstance(v, list | tuple | np.ndarray):
            out.append(clean_labels(_strings(v, where, row)))
        else:
            raise ValueError(
                f"{where}, row {row}: got {v!r} ({type(v).__name__}), expected a list of strings "
                f"(possibly empty); {_FIX}"
            )
    return out


def item_facets(items: pd.DataFrame) -> list[list[str]]:
    """The facets of an items table (`read_items` output), row order: N lists of str.

    Raises:
        ValueError: the table has no facets column (prepared before facets existed).
    """
    if FACETS not in items.columns:
        raise ValueError(
            f"the items table has no {FACETS!r} column (columns: {list(map(str, items.columns))}); it was "
            f"prepared before facets existed: {_FIX}"
        )
    return to_facet_lists(items[FACETS].tolist())


def facet_matrix(
    facets: Sequence[Sequence[str]], min_items: int = 1
) -> tuple[list[str], scipy.sparse.csr_matrix]:
    """Item x facet incidence matrix.

    Args:
        facets: N label lists (e.g. `item_facets(items)`); a label repeated within an item counts once.
        min_items: keep facets held by at least this many items (>= 1).

    Returns:
        (names, m): `names` the kept facets, sorted (F,); `m` a bool `scipy.sparse.csr_matrix` (N, F) with
        `m[i, f]` True iff item i has facet `names[f]`.

    Raises:
        ValueError: min_items < 1.

    Example::

        names, m = facet_matrix([["Drama", "Comedy"], [], ["Drama"]], min_items=2)
        # names == ["Drama"]; m.toarray() == [[True], [False], [True]]
    """
    import scipy.sparse

    if min_items < 1:
        raise ValueError(f"min_items must be >= 1, got {min_items}")
    pairs = {(i, str(lab)) for i, labs in enumerate(facets) for lab in labs}
    counts: dict[str, int] = {}
    for _, lab in pairs:
        counts[lab] = counts.get(lab, 0) + 1
    names = sorted(lab for lab, c in counts.items() if c >= min_items)
    col = {lab: j for j, lab in enumerate(names)}
    kept = sorted((i, col[lab]) for i, lab in pairs if lab in col)
    rows = np.fromiter((i for i, _ in kept), dtype=np.int64, count=len(kept))
    cols = np.fromiter((j for _, j in kept), dtype=np.int64, count=len(kept))
    m = scipy.sparse.csr_matrix(
        (np.ones(len(kept), dtype=bool), (rows, cols)), shape=(len(facets), len(names)), dtype=bool
    )
    return names, m


def facet_stats(facets: Sequence[Sequence[str]], source: str | None) -> dict[str, Any]:
    """The `facets` object of prepare's meta.json: n_items_with_facets, n_distinct, source."""
    return {
        "n_items_with_facets": int(sum(1 for f in facets if len(f))),
        "n_distinct": len({lab for f in facets for lab in f}),
        "source": source,
    }


# ---------------------------------------------------------------------------------------------- helpers


def _is_null(v: object) -> bool:
    return v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v))


def _strings(v: Iterable[object], where: str, row: int) -> list[str]:
    out: list[str] = []
    for x in v:
        if _is_null(x):
            continue
        if not isinstance(x, str):
            raise ValueError(
                f"{where}, row {row}: label {x!r} is {type(x).__name__}, expected strings only; cast the "
                f"labels to string"
            )
        out.append(x)
    return out
