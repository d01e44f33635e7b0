"""Validate catalogs and interaction tables before they become canonical tables.

`validate_catalog` and `validate_interactions` take a raw-ish frame, coerce what can be coerced without
guessing (integer ids -> strings, integral float ts -> int64) and sort every row into "clean" or "bad".
Bad rows either raise one ValueError that names the problem, the count, the first few rows/ids and the fix,
or (with `skip_bad_rows=True`) come back as a rejects frame that the caller writes to `rejects.parquet`:
nothing is ever dropped silently.

Rejects frame columns (`REJECT_COLUMNS`): `table` ("items" | "interactions"), `row` (int64, 0-based row of
the frame given to the validator or of the source file for adapter-level rejects), `item_id`, `user_id`
(strings or null), `reason` (short snake_case word, e.g. "duplicate_id", "unknown_item").

Row numbers in messages are 0-based data rows (a CSV's header line is not counted).

Tests: tests/test_catalog.py.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from llmrec.data.facets import to_facet_lists
from llmrec.schema import EVENT, EVENT_KINDS, FACETS, ITEM_ID, RATING, TEXT, TS, USER_ID

logger = logging.getLogger(__name__)

REJECT_COLUMNS = ("table", "row", ITEM_ID, USER_ID, "reason")
SKIP_HINT = "fix the source, or pass --skip-bad-rows (skip_bad_rows=True) to write them to rejects.parquet"
_SHOW = 5  # how many offending rows a message names

_REASON_TEXT = {
    "missing_id": "missing or empty {id}",
    "bad_id_type": "{id} that is not a string or an integer",
    "duplicate_id": "duplicate {id} (the first occurrence is kept)",
    "empty_text": "empty text (all of {cols} empty or null)",
    "non_string_text": "non-string values in text columns {cols}",
    "missing_user": "missing or empty user_id",
    "bad_user_type": "user_id that is not a string or an integer",
    "missing_item": "missing or empty item_id",
    "bad_item_type": "item_id that is not a string or an integer",
    "unknown_item": "item_id not in the items table",
    "bad_ts": "ts that is missing or not an integer (unix seconds or an order)",
    "bad_rating": "rating that is not a number",
    "bad_event": f"event not in {list(EVENT_KINDS)}",
}


def empty_rejects() -> pd.DataFrame:
    """A rejects frame with no rows and the canonical columns/dtypes."""
    return make_rejects("items", [], [], None, [])


def make_rejects(
    table: str,
    rows: Sequence[int],
    item_ids: Sequence[object] | None,
    user_ids: Sequence[object] | None,
    reasons: Sequence[str] | str,
) -> pd.DataFrame:
    """Build a rejects frame (REJECT_COLUMNS) for `len(rows)` rejected rows of `table`."""
    n = len(rows)
    if isinstance(reasons, str):
        reasons = [reasons] * n

    def _col(vals: Sequence[object] | None) -> pd.Series:
        if vals is None:
            return pd.Series([None] * n, dtype="object")
        return pd.Series([None if _is_missing(v) else str(v) for v in vals], dtype="object")

    return pd.DataFrame(
        {
            "table": pd.Series([table] * n, dtype="object"),
            "row": pd.Series(np.asarray(rows, dtype=np.int64)),
            ITEM_ID: _col(item_ids),
            USER_ID: _col(user_ids),
            "reason": pd.Series(list(reasons), dtype="object"),
        }
    )


def join_text(parts: Iterable[object], sep: str = ". ") -> str:
    """Join non-empty string parts into one text; a part already ending in . ! ? or : is joined by a space."""
    out = ""
    for p in parts:
        if p is None or (isinstance(p, float) and math.isnan(p)):
            continue
        s = str(p).strip()
        if not s:
            continue
        if not out:
            out = s
        elif out[-1] in ".!?:;":
            out = f"{out} {s}"
        else:
            out = f"{out}{sep}{s}"
    return out


def validate_catalog(
    df: pd.DataFrame,
    id_col: str,
    text_cols: Sequence[str],
    skip_bad_rows: bool = False,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Check a catalog and return it in canonical form.

    Args:
        df: one row per item, any columns.
        id_col: the column holding the item id (strings or integers).
        text_cols: columns joined (". ") into the canonical `text`; with `text_cols=["text"]` the text is
            kept as is (stripped).
        skip_bad_rows: move bad rows to the rejects frame instead of raising.

    Returns:
        (clean, rejects): `clean` has `item_id` (str, unique, non-empty) and `text` (str, non-empty) first,
        then every other column of `df` (the id column renamed to `item_id`), index reset; a `facets` column
        (schema.FACETS) comes back in its canonical form, one cleaned `list[str]` per row (null -> []; see
        llmrec.data.facets); `rejects` has REJECT_COLUMNS with table="items" and `row` = 0-based position
        in `df`.

    Raises:
        ValueError: a named column is missing or of the wrong type (always), a `facets` value that is not a
            list of strings (always), or bad rows exist and `skip_bad_rows` is False. The message names the
            count, the first rows/ids and the fix.
    """
    t0 = pd.Timestamp.now()
    if isinstance(text_cols, str):
        text_cols = [c.strip() for c in text_cols.split(",") if c.strip()]
    text_cols = list(text_cols)
    if not text_cols:
        raise ValueError("text_cols is empty: name at least one column holding item text (--text-cols A,B)")
    missing = [c for c in [id_col, *text_cols] if c not in df.columns]
    if missing:
        raise ValueError(
            f"items: column(s) {missing} not found; the table has columns {list(map(str, df.columns))}; "
            f"pass the right --id-col / --text-cols"
        )
    if id_col != ITEM_ID and ITEM_ID in df.columns:
        raise ValueError(
            f"items: id column is {id_col!r} but the table also has a column {ITEM_ID!r}; rename or drop "
            f"{ITEM_ID!r}, or pass --id-col {ITEM_ID}"
        )
    if TEXT in df.columns and text_cols != [TEXT]:
        raise ValueError(
            f"items: the table has a {TEXT!r} column but --text-cols is {text_cols}; "
            f"the canonical text would "
            f"overwrite it: add {TEXT!r} to --text-cols or rename that column"
        )
    for c in text_cols:
        s = df[c]
        if not (
            pd.api.types.is_object_dtype(s) or pd.api.types.is_string_dtype(s)
        ) or pd.api.types.is_bool_dtype(s):
            if s.isna().all():
                continue
            raise ValueError(
                f"items: text column {c!r} has dtype {s.dtype}, text columns must hold strings; "
                f"drop it from --text-cols or cast it to string first"
            )

    facets = None
    if FACETS in df.columns:
        facets = to_facet_lists(df[FACETS].tolist(), f"items: column {FACETS!r}")

    n = len(df)
    ids, id_bad = _normalise_ids(df[id_col], "missing_id", "bad_id_type")
    reason: list[str | None] = list(id_bad)

    texts: list[str] = []
    for i, vals in enumerate(zip(*(df[c].tolist() for c in text_cols), strict=True)):
        if any(not _is_missing(v) and not isinstance(v, str) for v in vals):
            reason[i] = reason[i] or "non_string_text"
            texts.append("")
            continue
        t = join_text(vals)
        if not t:
            reason[i] = reason[i] or "empty_text"
        texts.append(t)

    seen: set[str] = set()
    for i, item in enumerate(ids):
        if reason[i] is None:
            if item in seen:
                reason[i] = "duplicate_id"
            else:
                seen.add(item)

    bad = [i for i in range(n) if reason[i] is not None]
    fmt = {"id": id_col, "cols": text_cols}
    if bad and not skip_bad_rows:
        raise ValueError(_problems_message("items", bad, reason, ids, None, fmt))

    rest = [c for c in df.columns if c != id_col and c not in (text_cols if text_cols == [TEXT] else [])]
    clean = df[rest].copy()
    if facets is not None and FACETS in clean.columns:
        clean[FACETS] = pd.Series(facets, index=clean.index, dtype="object")
    clean.insert(0, TEXT, texts)
    clean.insert(0, ITEM_ID, ids)
    rejects = make_rejects("items", bad, [df[id_col].iloc[i] for i in bad], None, [reason[i] for i in bad])
    if bad:
        keep = np.ones(n, dtype=bool)
        keep[bad] = False
        clean = clean[keep]
        logger.warning("items: %d of %d rows rejected (%s)", len(bad), n, _reason_counts(reason))
    clean = clean.reset_index(drop=True)
    clean[ITEM_ID] = clean[ITEM_ID].astype(str)
    clean[TEXT] = clean[TEXT].astype(str)
    logger.debug("validated %d items in %.2fs", n, (pd.Timestamp.now() - t0).total_seconds())
    return clean, rejects


def validate_interactions(
    df: pd.DataFrame,
    item_ids: Iterable[str] | None = None,
    skip_bad_rows: bool = False,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Check an interactions table in canonical column names and return it with canonical dtypes.

    Args:
        df: columns user_id, item_id, ts, rating, event (extra columns are refused).
        item_ids: the catalog's ids; interactions with other item ids are "unknown_item";
            None skips that check.
        skip_bad_rows: move bad rows to the rejects frame instead of raising.

    Returns:
        (clean, rejects): clean has user_id str, item_id str, ts int64, rating float64 (NaN = null),
        event str,
        in the input order, index reset; rejects has REJECT_COLUMNS with table="interactions".

    Raises:
        ValueError: missing/unknown columns (always) or bad rows without `skip_bad_rows`.
    """
    cols = [USER_ID, ITEM_ID, TS, RATING, EVENT]
    missing = [c for c in cols if c not in df.columns]
    extra = [c for c in df.columns if c not in cols]
    if missing or extra:
        raise ValueError(
            f"interactions: expected columns {cols}, missing {missing}, unknown {extra}; map them with "
            f"--user-col/--item-col/--ts-col/--rating-col/--event-col"
        )
    n = len(df)
    users, user_bad = _normalise_ids(df[USER_ID], "missing_user", "bad_user_type")
    items, item_bad = _normalise_ids(df[ITEM_ID], "missing_item", "bad_item_type")
    reason: list[str | None] = [u or i for u, i in zip(user_bad, item_bad, strict=True)]

    if item_ids is not None:
        known = set(map(str, item_ids))
        for k, it in enumerate(items):
            if reason[k] is None and it not in known:
                reason[k] = "unknown_item"

    ts, ts_bad = _coerce_int(df[TS])
    rating, rating_bad = _coerce_float(df[RATING])
    ev = df[EVENT].tolist()
    kinds = set(EVENT_KINDS)
    for k in range(n):
        if reason[k] is None:
            if ts_bad[k]:
                reason[k] = "bad_ts"
            elif rating_bad[k]:
                reason[k] = "bad_rating"
            elif not isinstance(ev[k], str) or ev[k] not in kinds:
                reason[k] = "bad_event"

    bad = [k for k in range(n) if reason[k] is not None]
    if bad and not skip_bad_rows:
        raise ValueError(_problems_message("interactions", bad, reason, items, users, {}))
    keep = np.ones(n, dtype=bool)
    keep[bad] = False
    clean = pd.DataFrame(
        {
            USER_ID: pd.Series(users, dtype="object")[keep].astype(str),
            ITEM_ID: pd.Series(items, dtype="object")[keep].astype(str),
            TS: ts[keep].astype(np.int64),
            RATING: rating[keep].astype(np.float64),
            EVENT: pd.Series(ev, dtype="object")[keep].astype(str),
        }
    ).reset_index(drop=True)
    rejects = make_rejects(
        "interactions",
        bad,
        [df[ITEM_ID].iloc[k] for k in bad],
        [df[USER_ID].iloc[k] for k in bad],
        [reason[k] for k in bad],
    )
    if bad:
        logger.warning("interactions: %d of %d rows rejected (%s)", len(bad), n, _reason_counts(reason))
    return clean, rejects


# ---------------------------------------------------------------------------------------------- helpers


def _is_missing(v: object) -> bool:
    if v is None or v is pd.NA or v is pd.NaT:
        return True
    return isinstance(v, float) and math.isnan(v)


def _normalise_ids(s: pd.Series, missing_reason: str, type_reason: str) -> tuple[list[str], list[str | None]]:
    """Ids as strings: str stripped, ints -> decimal, integral floats -> int -> decimal; else a reason."""
    if pd.api.types.is_integer_dtype(s) and not pd.api.types.is_bool_dtype(s) and not s.isna().any():
        return s.astype(str).tolist(), [None] * len(s)
    out: list[str] = []
    bad: list[str | None] = []
    for v in s.tolist():
        if _is_missing(v):
            out.append("")
            bad.append(missing_reason)
        elif isinstance(v, str):
            v = v.strip()
            out.append(v)
            bad.append(None if v else missing_reason)
        elif isinstance(v, bool | np.bool_):
            out.append(str(v))
            bad.append(type_reason)
        elif isinstance(v, numbers.Integral):
            out.append(str(int(v)))
            bad.append(None)
        elif isinstance(v, numbers.Real) and float(v).is_integer():
            out.append(str(int(v)))
            bad.append(None)
        else:
            out.append(str(v))
            bad.append(type_reason)
    return out, bad


def _coerce_int(s: pd.Series) -> tuple[pd.Series, np.ndarray]:
    """int64 values (0 where bad) and a bad mask: null, non-numeric or non-integral values are bad."""
    if pd.api.types.is_integer_dtype(s) and not s.isna().any() and not pd.api.types.is_bool_dtype(s):
        return s.astype(np.int64).reset_index(drop=True), np.zeros(len(s), dtype=bool)
    num = pd.to_numeric(pd.Series(s.tolist(), dtype="object"), errors="coerce").astype(np.float64)
    arr = num.to_numpy()
    bad = ~np.isfinite(arr) | (arr != np.round(arr))
    if pd.api.types.is_bool_dtype(s):
        bad[:] = True
    return pd.Series(np.where(bad, 0, arr).astype(np.int64)), bad


def _coerce_float(s: pd.Series) -> tuple[pd.Series, np.ndarray]:
    """float64 values (NaN = null) and a bad mask: non-null values that are not numbers are bad."""
    if pd.api.types.is_float_dtype(s) or (
        pd.api.types.is_integer_dtype(s) and not pd.api.types.is_bool_dtype(s)
    ):
        return s.astype(np.float64).reset_index(drop=True), np.zeros(len(s), dtype=bool)
    vals = s.tolist()
    num = pd.to_numeric(pd.Series(vals, dtype="object"), errors="coerce").astype(np.float64).to_numpy()
    was_null = np.array([_is_missing(v) for v in vals], dtype=bool)
    bad = np.isnan(num) & ~was_null
    bad |= np.array([isinstance(v, bool | np.bool_) for v in vals], dtype=bool)
    return pd.Series(np.where(bad, np.nan, num)), bad


def _reason_counts(reason: Sequence[str | None]) -> str:
    counts: dict[str, int] = {}
    for r in reason:
        if r is not None:
            counts[r] = counts.get(r, 0) + 1
    return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))


def _problems_message(
    table: str,
    bad: Sequence[int],
    reason: Sequence[str | None],
    ids: Sequence[str],
    users: Sequence[str] | None,
    fmt: dict[str, object],
) -> str:
    """One line per problem kind: count, first rows with ids, then the fix."""
    fmt = {"id": ITEM_ID, "cols": [], **fmt}
    by: dict[str, list[int]] = {}
    for k in bad:
        by.setdefault(str(reason[k]), []).append(k)
    lines = []
    for r, rows in sorted(by.items()):
        shown = []
        for k in rows[:_SHOW]:
            who = f"{ITEM_ID if table == 'interactions' else fmt['id']}={ids[k]!r}"
            if users is not None:
                who = f"user_id={users[k]!r} {who}"
            shown.append(f"row {k} ({who})")
        more = f" and {len(rows) - _SHOW} more" if len(rows) > _SHOW else ""
        desc = _REASON_TEXT.get(r, r).format(**fmt)
        lines.append(f"{len(rows)} row(s) with {desc} [{r}]: {', '.join(shown)}{more}")
    return (
        f"{table}: {len(bad)} bad row(s) of {len(ids)}: " + "; ".join(lines) + f". To continue: {SKIP_HINT}"
    )
