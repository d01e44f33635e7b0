"""Any catalog in parquet, CSV/TSV or JSON lines: `--items FILE --id-col COL --text-cols A,B`.

- Files are read by suffix: `.parquet`/`.pq`, `.csv`, `.tsv`, `.jsonl`/`.ndjson`/`.json` (JSON lines),
  each optionally `.gz`. A relative path is taken relative to `--source`. `--items` / `--interactions` may
  also be a folder of shards of one such kind (read in name order; `.`/`_` names like _SUCCESS skipped), e.g.
  the output of `python -m llmrec.data.synthetic`.
- Items: the id column becomes `item_id`, the text columns are joined with ". " into `text`; every other
  column is kept. CSV/TSV ids are read as strings (leading zeros survive).
- Facets (optional `--facet-cols A,B`): per item, the labels of those columns, in column order, duplicates
  dropped (llmrec.data.facets.labels_from_column): a list-valued column (JSON lines, parquet) is taken as
  is; a string column is split on "|" and on ";" (never on ","; labels hold commas); null -> no label.
  CSV/TSV facet columns are read as strings. Without `--facet-cols`, a source column named `facets` is
  used the same way; with neither, every item gets []. The source columns stay as they are (a source
  `facets` column must then be one of `--facet-cols`).
- Interactions (optional `--interactions FILE`): columns `--user-col/--item-col/--ts-col/--rating-col/
  --event-col` (defaults user_id, item_id, ts, rating, event) are renamed to the canonical names; other
  columns are refused by validation, so extra columns are left out here and counted in the log.
  * ts: integers (unix s or an order) as they are; datetimes or date strings -> unix s (UTC). With no ts
    column (and none named) ts is the row order of the file (a monotone order).
  * rating: absent -> null. event: absent -> "rating" where a rating is given, else `default_event`.
Validation (bad ids, empty text, unknown items...) happens in llmrec.data.prepare through catalog.py.
Tests: tests/test_prepare.py.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from llmrec.data.adapters import Loaded
from llmrec.data.facets import clean_labels, labels_from_column
from llmrec.schema import EVENT, EVENT_KINDS, FACETS, ITEM_ID, RATING, TEXT, TS, USER_ID

logger = logging.getLogger(__name__)

NAME = "generic"
_FLAGS = {
    USER_ID: "--user-col",
    ITEM_ID: "--item-col",
    TS: "--ts-col",
    RATING: "--rating-col",
    EVENT: "--event-col",
}
SUFFIXES = (".parquet", ".pq", ".csv", ".tsv", ".jsonl", ".ndjson", ".json")


def table_files(path: Path) -> list[Path]:
    """The files of a table: `path` itself, or a folder's shards (supported suffixes, one kind, name order;
    names starting with "." or "_" are skipped, e.g. _SUCCESS)."""
    if not path.is_dir():
        return [path]
    files = sorted(
        f
        for f in path.iterdir()
        if f.is_file() and not f.name.startswith((".", "_")) and _suffix(f) in SUFFIXES
    )
    kinds = sorted({_suffix(f) for f in files})
    if not files:
        raise FileNotFoundError(
            f"{path} is a folder without table files; it needs shards named *{'/*'.join(SUFFIXES)} "
            "(optionally .gz)"
        )
    if len(kinds) > 1:
        raise ValueError(f"{path}: shards of several kinds {kinds}; keep one file type per table folder")
    return files


def read_table(path: Path, str_cols: list[str] | None = None) -> pd.DataFrame:
    """Read a parquet / CSV / TSV / JSON-lines file (optionally .gz) chosen by its suffix, or a folder of such
    shards (concatenated in name order)."""
    if path.is_dir():
        return pd.concat([read_table(f, str_cols) for f in table_files(path)], ignore_index=True)
    name = path.name.lower()
    base = name[:-3] if name.endswith(".gz") else name
    suffix = "." + base.rsplit(".", 1)[-1] if "." in base else ""
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist; pass an existing file (relative paths are under --source)"
        )
    if suffix in (".parquet", ".pq"):
        return pd.read_parquet(path)
    if suffix in (".csv", ".tsv"):
        dtype = {c: str for c in (str_cols or [])}
        return pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", dtype=dtype)
    if suffix in (".jsonl", ".ndjson", ".json"):
        return pd.read_json(path, lines=True, dtype=False)
    raise ValueError(
        f"{path}: unsupported file type {suffix!r}; use one of {list(SUFFIXES)} (optionally .gz)"
    )


def _suffix(path: Path) -> str:
    name = path.name.lower()
    base = name[:-3] if name.endswith(".gz") else name
    return "." + base.rsplit(".", 1)[-1] if "." in base else ""


def load(
    source: Path | None,
    items: str | Path | None = None,
    id_col: str = ITEM_ID,
    text_cols: str | list[str] = TEXT,
    interactions: str | Path | None = None,
    user_col: str | None = None,
    item_col: str | None = None,
    ts_col: str | None = None,
    rating_col: str | None = None,
    event_col: str | None = None,
    default_event: str = "view",
    facet_cols: str | list[str] | None = None,
) -> Loaded:
    if items is None:
        raise ValueError("dataset 'generic' needs --items FILE (a parquet, CSV or JSONL catalog)")
    if default_event not in EVENT_KINDS:
        raise ValueError(f"default_event {default_event!r} is not one of {list(EVENT_KINDS)}")
    cols = [c.strip() for c in text_cols.split(",")] if isinstance(text_cols, str) else list(text_cols)
    fcols = _split_cols(facet_cols)
    items_p = _path(source, items)
    item_df = read_table(items_p, [id_col, *cols, *fcols])  # CSV: "1984" stays a title, "007" an id
    # the text becomes `text`; validate_catalog does the joining and all the checks
    item_df, facet_source = _with_facets(item_df, fcols, items_p)
    loaded = Loaded(items=item_df, interactions=_empty_interactions(), files=table_files(items_p))
    loaded.facet_source = facet_source
    loaded.notes = {"id_col": id_col, "text_cols": cols, "items_file": str(items_p)}
    if interactions is None:
        logger.info("generic: %d item rows from %s, no interactions", len(item_df), items_p)
        return loaded

    inter_p = _path(source, interactions)
    names = {USER_ID: user_col, ITEM_ID: item_col, TS: ts_col, RATING: rating_col, EVENT: event_col}
    raw = read_table(inter_p, [names[USER_ID] or USER_ID, names[ITEM_ID] or ITEM_ID])
    out = {}
    for canon, given in names.items():
        col = given or canon
        if col in raw.columns:
            out[canon] = raw[col]
        elif given is not None or canon in (USER_ID, ITEM_ID):
            raise ValueError(
                f"{inter_p}: column {col!r} (for {canon}) not found; "
                f"columns are {list(map(str, raw.columns))}; "
                f"pass {_FLAGS[canon]} with the right name"
            )
    n = len(raw)
    used = {given or canon for canon, given in names.items() if (given or canon) in raw.columns}
    unused = [c for c in raw.columns if c not in used]
    if unused:
        logger.info("generic: interactions columns not used: %s", unused)
    if TS not in out:
        logger.info("generic: no ts column; ts = row order in %s", inter_p.name)
        out[TS] = pd.Series(np.arange(n, dtype=np.int64))
        loaded.notes["ts_is_order"] = True
    else:
        out[TS] = _ts_seconds(out[TS])
    if RATING not in out:
        out[RATING] = pd.Series(np.full(n, np.nan))
    if EVENT not in out:
        rated = pd.to_numeric(out[RATING], errors="coerce").notna().to_numpy()
        out[EVENT] = pd.Series(np.where(rated, "rating", default_event), dtype="object")
    loaded.interactions = pd.DataFrame({k: pd.Series(out[k]).reset_index(drop=True) for k in names})
    loaded.files.extend(table_files(inter_p))
    loaded.notes["interactions_file"] = str(inter_p)
    logger.info("generic: %d item rows, %d interaction rows", len(item_df), n)
    return loaded


def _split_cols(cols: str | list[str] | None) -> list[str]:
    if cols is None:
        return []
    parts = cols.split(",") if isinstance(cols, str) else list(cols)
    return [c.strip() for c in parts if c.strip()]


def _with_facets(df: pd.DataFrame, fcols: list[str], path: Path) -> tuple[pd.DataFrame, str | None]:
    """`df` with the canonical `facets` column built from `fcols` (module docstring), and its source."""
    if not fcols and FACETS in df.columns:
        fcols = [FACETS]
        logger.info("generic: using the catalog's own %r column as facets", FACETS)
    missing = [c for c in fcols if c not in df.columns]
    if missing:
        raise ValueError(
            f"{path}: facet column(s) {missing} not found; the table has columns "
            f"{list(map(str, df.columns))}; pass --facet-cols with names from that list"
        )
    if FACETS in df.columns and FACETS not in fcols:
        raise ValueError(
            f"{path}: the table has a {FACETS!r} column but --facet-cols is {fcols}; the canonical facets "
            f"would overwrite it: add {FACETS!r} to --facet-cols or rename that column"
        )
    if not fcols:
        logger.info("generic: no --facet-cols and no %r column: every item gets facets []", FACETS)
        return df, None  # prepare adds the all-[] column after validation
    per_col = [labels_from_column(df[c].tolist(), c) for c in fcols]
    facets = [clean_labels(lab for labs in row for lab in labs) for row in zip(*per_col, strict=True)]
    n_with = sum(1 for f in facets if f)
    logger.info("generic: facets from %s: %d of %d items have at least one", fcols, n_with, len(df))
    return df.assign(**{FACETS: facets}), f"columns {fcols} ('|' or ';' separated strings, or lists)"


def _path(source: Path | None, p: str | Path) -> Path:
    p = Path(p)
    return p if p.is_absolute() or source is None else Path(source) / p


def _empty_interactions() -> pd.DataFrame:
    return pd.DataFrame(
        {
            USER_ID: pd.Series([], dtype=object),
            ITEM_ID: pd.Series([], dtype=object),
            TS: pd.Series([], dtype=np.int64),
            RATING: pd.Series([], dtype=np.float64),
            EVENT: pd.Series([], dtype=object),
        }
    )


def _ts_seconds(s: pd.Series) -> pd.Series:
    """Numbers stay as they are (checked later); datetimes and date strings become unix seconds (UTC)."""
    if pd.api.types.is_datetime64_any_dtype(s):
        dt = pd.to_datetime(s, utc=True)
        return pd.Series([None if pd.isna(x) else int(x.timestamp()) for x in dt], dtype="object")
    if pd.api.types.is_numeric_dtype(s):
        return s
    vals = s.tolist()
    out: list[object] = []
    for v in vals:
        if isinstance(v, str):
            num = pd.to_numeric(v, errors="coerce")
            if not pd.isna(num):
                out.append(num)
                continue
            dt = pd.to_datetime(v, utc=True, errors="coerce")
            out.append(v if pd.isna(dt) else int(dt.timestamp()))  # unparseable stays -> "bad_ts"
        else:
            out.append(v)
    return pd.Series(out, dtype="object")
