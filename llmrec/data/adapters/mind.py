"""MIND small, random sample: news.tsv -> items, behaviors.tsv clicks -> interactions.

- Items: every news row; text = "title. abstract"; kept fields `title`, `abstract`, `category`,
  `subcategory`, `url`. Facets: [category, subcategory], the non-empty ones (a subcategory equal to its
  category once).
- Interactions (event "click", rating null):
  * impression clicks (`NID-1` in the impressions column) at the impression time (parsed as UTC
    "MM/DD/YYYY hh:mm:ss AM/PM" -> unix s);
  * history clicks, once per user (MIND repeats the same history on each of a user's impressions), placed
    just before the user's first impression: the i-th of L history clicks gets `t0 - L + i`, so every
    history click is strictly earlier than any impression of that user and keeps its order.
- A click on news without a row in news.tsv cannot be embedded: it goes to rejects (reason
  "news_without_text"). With this sample that is most clicks (see the data README's coverage warning);
  the counts are logged and in meta.json. Tests: tests/test_prepare.py.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from llmrec.data.adapters import Loaded, require_files
from llmrec.data.catalog import join_text, make_rejects
from llmrec.data.facets import clean_labels
from llmrec.schema import EVENT, FACETS, ITEM_ID, RATING, TEXT, TS, USER_ID

logger = logging.getLogger(__name__)

NAME = "mind-small-sample"
FILES = ["news.tsv.gz", "behaviors.tsv.gz"]
HOMEPAGE = "https://msnews.github.io/"  # MIND small (MINDsmall_train news.tsv, behaviors.tsv), gzipped
NEWS_COLS = [
    "news_id",
    "category",
    "subcategory",
    "title",
    "abstract",
    "url",
    "title_entities",
    "abstract_entities",
]
BEHAVIOR_COLS = ["impression_id", "user_id", "time", "history", "impressions"]


def load(source: Path) -> Loaded:
    news_p, beh_p = require_files(source, FILES, NAME, HOMEPAGE)
    news = pd.read_csv(
        news_p, sep="\t", header=None, names=NEWS_COLS, dtype=str, keep_default_na=False, quoting=3
    )
    items = pd.DataFrame(
        {
            ITEM_ID: news["news_id"],
            TEXT: [join_text([t, a]) for t, a in zip(news["title"], news["abstract"], strict=True)],
            "title": news["title"],
            "abstract": news["abstract"],
            "category": news["category"],
            "subcategory": news["subcategory"],
            "url": news["url"],
            FACETS: [clean_labels(cs) for cs in zip(news["category"], news["subcategory"], strict=True)],
        }
    )
    beh = pd.read_csv(
        beh_p, sep="\t", header=None, names=BEHAVIOR_COLS, dtype=str, keep_default_na=False, quoting=3
    )
    times = pd.to_datetime(beh["time"], format="%m/%d/%Y %I:%M:%S %p", utc=True)
    beh["ts"] = (times - pd.Timestamp("1970-01-01", tz="UTC")) // pd.Timedelta(seconds=1)

    users: list[str] = []
    news_ids: list[str] = []
    ts: list[int] = []
    first = beh.sort_values(["ts", "impression_id"], kind="stable").drop_duplicates("user_id")
    n_hist = 0
    for u, t0, hist in zip(first["user_id"], first["ts"], first["history"], strict=True):
        h = hist.split()
        users.extend([u] * len(h))
        news_ids.extend(h)
        ts.extend(int(t0) - len(h) + i for i in range(len(h)))
        n_hist += len(h)
    for u, t, imp in zip(beh["user_id"], beh["ts"], beh["impressions"], strict=True):
        for tok in imp.split():
            nid, _, label = tok.rpartition("-")
            if label == "1":
                users.append(u)
                news_ids.append(nid)
                ts.append(int(t))
    n_imp = len(users) - n_hist
    all_clicks = pd.DataFrame(
        {
            USER_ID: users,
            ITEM_ID: news_ids,
            TS: np.asarray(ts, dtype=np.int64),
            RATING: np.full(len(users), np.nan),
            EVENT: "click",
        }
    )
    has_text = all_clicks[ITEM_ID].isin(set(items[ITEM_ID])).to_numpy()
    bad = np.flatnonzero(~has_text)
    rejects = make_rejects(
        "interactions",
        bad.tolist(),
        all_clicks[ITEM_ID].to_numpy()[bad].tolist(),
        all_clicks[USER_ID].to_numpy()[bad].tolist(),
        "news_without_text",
    )
    interactions = all_clicks[has_text].reset_index(drop=True)
    logger.warning(
        "mind: %d impressions, %d users; %d history clicks + %d impression clicks; %d clicks (%.0f%%) are on "
        "news without a text row and were rejected (see rejects.parquet)",
        len(beh),
        beh["user_id"].nunique(),
        n_hist,
        n_imp,
        len(bad),
        100.0 * len(bad) / max(1, len(all_clicks)),
    )
    notes = {"n_impressions": len(beh), "n_history_clicks": n_hist, "n_impression_clicks": n_imp}
    return Loaded(
        items=items,
        interactions=interactions,
        files=[news_p, beh_p],
        rejects=rejects,
        notes=notes,
        facet_source="news.tsv category, subcategory",
    )
