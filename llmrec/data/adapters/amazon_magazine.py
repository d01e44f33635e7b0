"""Amazon Magazine Subscriptions (2018): ratings-only CSV + metadata JSON lines.

- Ratings CSV has no header: `item(asin), user, rating, unix_ts`; every row becomes an interaction with
  event "rating".
- Metadata JSON lines are de-duplicated on `asin` (the first row is kept; the copies are identical).
- Item text: "<real title>. <description>. Category: a, b. Brand: x. Publisher: y." HTML tags and entities
  are removed. Most titles are the scraping artefact `<span class="a-size-medium a-color-secondary"`; a
  title is used only when it has no `<` and is not empty. The top-level category "Magazine Subscriptions"
  (on every item) is left out of the text.
- Usable text means a description or a real title: category/brand/publisher alone do not describe an item,
  so such items are rejected (reason "no_text") along with their ratings (reason "item_no_text"). Rated
  items without any metadata row are rejected with their ratings (reason "item_no_metadata"). All of them
  are counted, written to rejects.parquet and recorded in meta.json.
Original fields kept: `title` (real title or ""), `description`, `category` (", " joined), `brand`,
`publisher`. Facets: the metadata `category` list itself, cleaned (HTML entities: "&amp;" -> "&"), without
"Magazine Subscriptions", duplicates dropped. It is taken from the list, never from the joined `category`
string: names like "Arts, Music & Photography" hold commas.
Tests: tests/test_prepare.py.
"""

from __future__ import annotations

import gzip
import html
import json
import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd

from llmrec.data.adapters import Loaded, require_files
from llmrec.data.catalog import join_text, make_rejects
from llmrec.data.facets import clean_labels
from llmrec.schema import EVENT, FACETS, ITEM_ID, RATING, TEXT, TS, USER_ID

logger = logging.getLogger(__name__)

NAME = "amazon-magazine-subscriptions-2018"
FILES = ["Magazine_Subscriptions.csv.gz", "meta_Magazine_Subscriptions.json.gz"]
# Amazon Review Data (2018), category "Magazine Subscriptions": "ratings only" csv (gzipped here) + metadata
HOMEPAGE = "https://cseweb.ucsd.edu/~jmcauley/datasets/amazon_v2/"
_TAG = re.compile(r"<[^>]*>")
_WS = re.compile(r"\s+")
_TOP_CATEGORY = "Magazine Subscriptions"


def clean_html(s: object) -> str:
    """Strip HTML tags and entities and collapse whitespace."""
    if not isinstance(s, str):
        return ""
    return _WS.sub(" ", html.unescape(_TAG.sub(" ", s))).strip()


def real_title(t: object) -> str:
    """The title when it is real text, "" for the `<span class=...` artefact or an empty title."""
    if not isinstance(t, str) or "<" in t:
        return ""
    return clean_html(t)


def load(source: Path) -> Loaded:
    ratings_p, meta_p = require_files(source, FILES, NAME, HOMEPAGE)
    ratings = pd.read_csv(
        ratings_p,
        header=None,
        names=["asin", "user", "rating", "ts"],
        dtype={"asin": str, "user": str},
        keep_default_na=False,
    )
    rows: dict[str, dict] = {}
    row_no: dict[str, int] = {}
    n_lines = 0
    with gzip.open(meta_p, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            n_lines += 1
            rec = json.loads(line)
            asin = str(rec.get("asin", "")).strip()
            if asin and asin not in rows:
                rows[asin] = rec
                row_no[asin] = i
    logger.info("magazine: %d metadata lines, %d unique asins, %d ratings", n_lines, len(rows), len(ratings))

    recs = []
    for asin, r in rows.items():
        title = real_title(r.get("title"))
        desc_parts = r.get("description") or []
        if isinstance(desc_parts, str):
            desc_parts = [desc_parts]
        description = " ".join(p for p in (clean_html(d) for d in desc_parts) if p)
        cats = [clean_html(c) for c in (r.get("category") or []) if clean_html(c)]
        category = ", ".join(c for c in cats if c != _TOP_CATEGORY)
        facets = clean_labels(c for c in cats if c != _TOP_CATEGORY)
        brand = clean_html(r.get("brand"))
        details = r.get("details") or {}
        publisher = clean_html(details.get("Publisher:", "")) if isinstance(details, dict) else ""
        extra = [
            f"Category: {category}" if category else "",
            f"Brand: {brand}" if brand else "",
            f"Publisher: {publisher}" if publisher and publisher != brand else "",
        ]
        usable = bool(title or description)
        recs.append(
            {
                ITEM_ID: asin,
                TEXT: join_text([title, description, *extra]) if usable else "",
                "title": title,
                "description": description,
                "category": category,
                "brand": brand,
                "publisher": publisher,
                FACETS: facets,
                "_row": row_no[asin],
            }
        )
    meta_items = pd.DataFrame(recs)
    no_text = meta_items[TEXT] == ""
    items = meta_items[~no_text].drop(columns="_row").reset_index(drop=True)
    rejected_items = meta_items[no_text]

    with_text = set(items[ITEM_ID])
    has_meta = set(meta_items[ITEM_ID])
    asins = ratings["asin"].to_numpy()
    in_text = ratings["asin"].isin(with_text).to_numpy()
    in_meta = ratings["asin"].isin(has_meta).to_numpy()
    reason = np.where(in_text, "", np.where(in_meta, "item_no_text", "item_no_metadata"))
    keep = reason == ""
    kept = ratings[keep]
    interactions = pd.DataFrame(
        {
            USER_ID: kept["user"],
            ITEM_ID: kept["asin"],
            TS: kept["ts"],
            RATING: kept["rating"].astype(np.float64),
            EVENT: "rating",
        }
    ).reset_index(drop=True)
    bad_rows = np.flatnonzero(~keep)
    rejects = pd.concat(
        [
            make_rejects(
                "items", rejected_items["_row"].tolist(), rejected_items[ITEM_ID].tolist(), None, "no_text"
            ),
            make_rejects(
                "interactions",
                bad_rows.tolist(),
                ratings["asin"].to_numpy()[bad_rows].tolist(),
                ratings["user"].to_numpy()[bad_rows].tolist(),
                reason[bad_rows].tolist(),
            ),
        ],
        ignore_index=True,
    )
    n_no_meta_items = len(set(asins[reason == "item_no_metadata"]))
    logger.warning(
        "magazine: rejected %d items without description or real title (and %d of their ratings); "
        "%d rated items have no metadata (%d ratings rejected); see rejects.parquet",
        int(no_text.sum()),
        int((reason == "item_no_text").sum()),
        n_no_meta_items,
        int((reason == "item_no_metadata").sum()),
    )
    notes = {"n_metadata_lines": n_lines, "n_rated_items_without_metadata": n_no_meta_items}
    return Loaded(
        items=items,
        interactions=interactions,
        files=[ratings_p, meta_p],
        rejects=rejects,
        notes=notes,
        facet_source=f"metadata category list, HTML-unescaped, without {_TOP_CATEGORY!r}",
    )
