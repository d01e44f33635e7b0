"""Amazon 5-core review files (one JSON object per review, no item metadata): items described by reviews.

Used by the `amazon-all-beauty-5core-2018` and `amazon-musical-instruments-5core-2014` adapters. The files
hold only reviews (`reviewerID, asin, overall, unixReviewTime, summary, reviewText, ...`), so:

- Interactions: one per review, event "rating", `rating` = `overall`, `ts` = `unixReviewTime` (whole days:
  most users' last reviews share their day; evaluation breaks such ties at random, see llmrec.data.order).
  Exact duplicate reviews (same reviewer, item, day, stars, summary and text; All Beauty has 1,050, the same
  review listed under several product variants) are rejected with reason "duplicate_review" (rejects.parquet).
- Item text, defined honestly from what exists: a fixed base line "<category> product." (the same for every
  item: there is no title or description) followed by "Reviews: " and the item's reviews, oldest first, each
  "<summary>. <text>" cut to 300 characters, joined by " | ", the whole cut to 1,500 characters (the encoder
  reads the first 128 tokens, about the first one or two reviews). The reviews are user-written, so they are
  also kept in `text_events.parquet` with writer and day, and evaluation rebuilds each split's item text
  from the reviews written before its cutoff (an item with none there is just "<category> product.").
- No facets (no categories in the files).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from llmrec.data.adapters import Loaded, require_files
from llmrec.data.catalog import join_text, make_rejects
from llmrec.data.item_text import TextSpec, build_item_texts
from llmrec.schema import EVENT, FACETS, ITEM_ID, RATING, TEXT, TEXT_BASE, TS, USER_ID

logger = logging.getLogger(__name__)

REVIEW_SPEC = TextSpec(
    label="Reviews",
    sep=" | ",
    distinct=False,
    event_chars=300,
    max_chars=1500,
    source="review summary + text, oldest first",
)
_KEY = ["reviewerID", "asin", "unixReviewTime", "overall", "summary", "reviewText"]


def load_reviews(source: Path, file_name: str, category: str, dataset: str) -> Loaded:
    """Read one 5-core review file into canonical frames (see the module docstring)."""
    (path,) = require_files(source, [file_name], dataset)
    raw = pd.read_json(path, lines=True, dtype={"reviewerID": str, "asin": str})
    missing = [c for c in ("reviewerID", "asin", "overall", "unixReviewTime") if c not in raw.columns]
    if missing:
        raise ValueError(f"{path}: reviews lack fields {missing}; expected an Amazon 5-core review file")
    for c in ("summary", "reviewText"):
        raw[c] = raw[c].fillna("").astype(str) if c in raw.columns else ""
    dup = raw.duplicated(_KEY, keep="first").to_numpy()
    rejects = make_rejects(
        "interactions",
        np.flatnonzero(dup).tolist(),
        raw.loc[dup, "asin"].tolist(),
        raw.loc[dup, "reviewerID"].tolist(),
        "duplicate_review",
    )
    if dup.any():
        logger.info(
            "%s: %d exact duplicate reviews rejected (reason duplicate_review)", dataset, int(dup.sum())
        )
    rev = raw[~dup].reset_index(drop=True)
    interactions = pd.DataFrame(
        {
            USER_ID: rev["reviewerID"].astype(str),
            ITEM_ID: rev["asin"].astype(str),
            TS: rev["unixReviewTime"].astype("int64"),
            RATING: rev["overall"].astype(np.float64),
            EVENT: "rating",
        }
    )
    order = np.lexsort(
        (np.arange(len(rev)), rev["unixReviewTime"].to_numpy())
    )  # oldest first, then file order
    texts = [
        join_text([s, t]) for s, t in zip(rev["summary"].tolist(), rev["reviewText"].tolist(), strict=True)
    ]
    events = (
        pd.DataFrame(
            {
                USER_ID: rev["reviewerID"].astype(str),
                ITEM_ID: rev["asin"].astype(str),
                TS: rev["unixReviewTime"].astype("int64"),
                TEXT: texts,
            }
        )
        .iloc[order]
        .reset_index(drop=True)
    )
    events = events[events[TEXT].str.strip() != ""].reset_index(drop=True)
    ids = np.sort(rev["asin"].astype(str).unique())
    base = pd.Series(f"{category} product.", index=ids, dtype=object)
    items = pd.DataFrame(
        {
            ITEM_ID: ids,
            TEXT: build_item_texts(base, events, REVIEW_SPEC).to_numpy(),
            TEXT_BASE: base.to_numpy(),
            FACETS: [[] for _ in ids],
        }
    )
    logger.info(
        "%s: %d items, %d users, %d reviews (%d with text)",
        dataset,
        len(items),
        interactions[USER_ID].nunique(),
        len(interactions),
        len(events),
    )
    return Loaded(
        items=items,
        interactions=interactions,
        files=[path],
        rejects=rejects,
        facet_source=None,
        text_events=events,
        text_spec=REVIEW_SPEC,
        notes={"item_text": "reviews only (no item metadata), rebuilt per split in evaluation"},
    )
