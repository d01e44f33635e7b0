"""Read and write the canonical tables that `llmrec prepare` produces (see docs/design.md).

- `items.parquet`: `item_id` string (unique, non-empty), `text` string (non-empty), then original fields,
  and `facets` (`list<string>`, never null; optional: folders prepared before it existed lack it), read
  back as one Python `list[str]` per row (see `llmrec.data.facets`).
- `interactions.parquet`: `user_id` string, `item_id` string, `ts` int64, `rating` float64 (null allowed),
  `event` string in `schema.EVENT_KINDS`.
- `rejects.parquet` (only when rows were rejected): `table, row, item_id, user_id, reason`
  (see `llmrec.data.catalog`).

Readers check the schema on read and never coerce: a wrong table is an error that says what is wrong and
which command writes a good one. Tests: tests/test_prepare.py.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from llmrec.artifacts import atomic_write
from llmrec.schema import (
    EVENT,
    EVENT_KINDS,
    FACETS,
    INTERACTIONS_FILE,
    ITEM_ID,
    ITEMS_FILE,
    RATING,
    TEXT,
    TS,
    USER_ID,
)

logger = logging.getLogger(__name__)

REJECTS_FILE = "rejects.parquet"
_FIX = "re-run `llmrec prepare --dataset NAME --source DIR --out DIR` to write canonical tables"

INTERACTIONS_SCHEMA = pa.schema(
    [
        pa.field(USER_ID, pa.string(), nullable=False),
        pa.field(ITEM_ID, pa.string(), nullable=False),
        pa.field(TS, pa.int64(), nullable=False),
        pa.field(RATING, pa.float64()),
        pa.field(EVENT, pa.string(), nullable=False),
    ]
)
REJECTS_SCHEMA = pa.schema(
    [
        pa.field("table", pa.string()),
        pa.field("row", pa.int64()),
        pa.field(ITEM_ID, pa.string()),
        pa.field(USER_ID, pa.string()),
        pa.field("reason", pa.string()),
    ]
)


def read_items(path_or_dir: str | os.PathLike) -> pd.DataFrame:
    """Read `items.parquet` (a file, or a folder holding one) and check the canonical schema.

    Returns:
        DataFrame (N rows) with `item_id` and `text` (str) first, then the original fields, file order; when
        the file has `facets`, that column holds one Python `list[str]` per row (`[]` = no labels).

    Raises:
        FileNotFoundError: no such file. ValueError: missing/mistyped columns, null/empty/duplicate ids,
            null or empty text, a facets column that is not list<string> or holds nulls.
    """
    path = _resolve(path_or_dir, ITEMS_FILE)
    table = pq.read_table(path)
    _check_types(path, table, {ITEM_ID: "string", TEXT: "string"})
    if FACETS in table.column_names:
        t = table.schema.field(FACETS).type
        if not (
            (pa.types.is_list(t) or pa.types.is_large_list(t))
            and (pa.types.is_string(t.value_type) or pa.types.is_large_string(t.value_type))
        ):
            raise ValueError(f"{path}: column {FACETS!r} is {t}, expected list<string>; {_FIX}")
        col = table.column(FACETS)
        n_null = col.null_count + pc.list_flatten(col).null_count
        if n_null:
            raise ValueError(
                f"{path}: {n_null} null {FACETS!r} value(s) or label(s), expected lists of strings ([] for "
                f"none); {_FIX}"
            )
    df = table.to_pandas()
    if FACETS in df.columns:
        # pyarrow gives numpy object arrays; the documented in-memory form is a Python list of str per row
        df[FACETS] = [v.tolist() for v in df[FACETS]]
    ids = df[ITEM_ID]
    bad_id = ids.isna() | (ids.astype(str).str.strip() == "")
    if bad_id.any():
        raise ValueError(
            f"{path}: {int(bad_id.sum())} row(s) with empty item_id (rows {_first(bad_id)}); {_FIX}"
        )
    dup = ids.duplicated()
    if dup.any():
        raise ValueError(
            f"{path}: {int(dup.sum())} duplicate item_id(s) (e.g. {ids[dup].head(5).tolist()}); {_FIX}"
        )
    bad_text = df[TEXT].isna() | (df[TEXT].astype(str).str.strip() == "")
    if bad_text.any():
        raise ValueError(
            f"{path}: {int(bad_text.sum())} row(s) with empty text (rows {_first(bad_text)}); {_FIX}"
        )
    logger.debug("read %d items from %s", len(df), path)
    return df


def read_interactions(path_or_dir: str | os.PathLike) -> pd.DataFrame:
    """Read `interactions.parquet` (a file, or a folder holding one) and check the canonical schema.

    Returns:
        DataFrame (M rows): user_id str, item_id str, ts int64, rating float64 (NaN = null), event str.

    Raises:
        FileNotFoundError: no such file. ValueError: missing/mistyped columns, nulls, unknown event kinds.
    """
    path = _resolve(path_or_dir, INTERACTIONS_FILE)
    table = pq.read_table(path)
    _check_types(
        path, table, {USER_ID: "string", ITEM_ID: "string", TS: "int64", RATING: "double", EVENT: "string"}
    )
    df = table.to_pandas()
    for c in (USER_ID, ITEM_ID, TS, EVENT):
        null = df[c].isna()
        if null.any():
            raise ValueError(f"{path}: {int(null.sum())} null {c} value(s) (rows {_first(null)}); {_FIX}")
    bad_ev = ~df[EVENT].isin(EVENT_KINDS)
    if bad_ev.any():
        raise ValueError(
            f"{path}: {int(bad_ev.sum())} event value(s) not in {list(EVENT_KINDS)} "
            f"(e.g. {sorted(set(df[EVENT][bad_ev].head(5)))}); {_FIX}"
        )
    df[RATING] = df[RATING].astype(np.float64)
    logger.debug("read %d interactions from %s", len(df), path)
    return df


def write_items(items: pd.DataFrame, out_dir: str | os.PathLike) -> Path:
    """Write validated items to `out_dir/items.parquet` (item_id, text first); returns the path."""
    cols = [ITEM_ID, TEXT] + [c for c in items.columns if c not in (ITEM_ID, TEXT)]
    try:
        table = pa.Table.from_pandas(items[cols], preserve_index=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        bad = [c for c in cols if not _arrow_ok(items[c])]
        raise ValueError(
            f"items: column(s) {bad} cannot be stored in parquet ({e}); they mix value types: cast them to "
            f"one type or drop them from the source"
        ) from None
    fields = [pa.field(ITEM_ID, pa.string(), nullable=False), pa.field(TEXT, pa.string(), nullable=False)]
    # an all-empty facets column is inferred as list<null>: pin the documented list<string>
    rest = [
        pa.field(FACETS, pa.list_(pa.string())) if f.name == FACETS else f for f in list(table.schema)[2:]
    ]
    table = table.cast(pa.schema(fields + rest))
    return _write(table, Path(out_dir) / ITEMS_FILE)


def write_interactions(interactions: pd.DataFrame, out_dir: str | os.PathLike) -> Path:
    """Write validated interactions to `out_dir/interactions.parquet`; returns the path."""
    cols = [f.name for f in INTERACTIONS_SCHEMA]
    table = pa.Table.from_pandas(interactions[cols], schema=INTERACTIONS_SCHEMA, preserve_index=False)
    return _write(table, Path(out_dir) / INTERACTIONS_FILE)


def write_rejects(rejects: pd.DataFrame, out_dir: str | os.PathLike) -> Path | None:
    """Write `out_dir/rejects.parquet` if there are rejects, else remove a stale one; returns path or None."""
    path = Path(out_dir) / REJECTS_FILE
    if len(rejects) == 0:
        path.unlink(missing_ok=True)
        return None
    cols = [f.name for f in REJECTS_SCHEMA]
    table = pa.Table.from_pandas(rejects[cols], schema=REJECTS_SCHEMA, preserve_index=False)
    return _write(table, path)


def read_rejects(path_or_dir: str | os.PathLike) -> pd.DataFrame:
    """Read `rejects.parquet`; a folder without one means nothing was rejected (an empty frame)."""
    p = Path(path_or_dir)
    path = p / REJECTS_FILE if p.is_dir() else p
    if not path.is_file():
        return REJECTS_SCHEMA.empty_table().to_pandas()
    return pq.read_table(path).to_pandas()


# ---------------------------------------------------------------------------------------------- helpers


def _resolve(path_or_dir: str | os.PathLike, name: str) -> Path:
    p = Path(path_or_dir)
    path = p / name if p.is_dir() else p
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; {_FIX}")
    return path


def _check_types(path: Path, table: pa.Table, expected: dict[str, str]) -> None:
    problems = []
    for col, kind in expected.items():
        if col not in table.column_names:
            problems.append(f"column {col!r} is missing")
            continue
        t = table.schema.field(col).type
        ok = {
            "string": pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t),
            "int64": pa.types.is_int64(t),
            "double": pa.types.is_float64(t),
        }[kind]
        if not ok:
            problems.append(f"column {col!r} is {t}, expected {kind}")
    if problems:
        raise ValueError(f"{path}: " + "; ".join(problems) + f" (columns: {table.column_names}); {_FIX}")


def _arrow_ok(s: pd.Series) -> bool:
    try:
        pa.array(s, from_pandas=True)
        return True
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return False


def _first(mask: pd.Series, n: int = 5) -> list[int]:
    return [int(i) for i in np.flatnonzero(mask.to_numpy())[:n]]


def _write(table: pa.Table, path: Path) -> Path:
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))
    return path
