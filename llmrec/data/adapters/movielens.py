"""MovieLens latest-small (ml-latest-small): movies.csv + tags.csv -> items, ratings.csv -> interactions.

Item text: "<title>. Genres: A, B. Tags: t1, t2." The tags are the movie's distinct user tags
(case-insensitive, first spelling kept, in order of first appearance in tags.csv); "(no genres listed)"
gives no genre part. Original fields kept: `title`, `genres` ("A, B"; "" when none), `tags` ("t1, t2"), and
`text_base` ("<title>. Genres: A, B."): the tags are user-written, so they are also kept one per row with
their writer and time in `text_events.parquet`, and evaluation rebuilds each split's text from the tags
written before its cutoff (llmrec.data.item_text).
Facets: the genres as a list (["Adventure", "Animation", ...]; [] for "(no genres listed)"). Not the tags:
they are user-generated, and written by the same users the evaluation tests, so they would leak.
Interactions: every rating, event "rating", `ts` the unix timestamp. Tests: tests/test_prepare.py.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from llmrec.data.adapters import Loaded, require_files
from llmrec.data.catalog import join_text
from llmrec.data.facets import clean_labels
from llmrec.data.item_text import TextSpec, build_item_texts
from llmrec.schema import EVENT, FACETS, ITEM_ID, RATING, TEXT, TEXT_BASE, TS, USER_ID

logger = logging.getLogger(__name__)

NAME = "movielens-latest-small"
FILES = ["movies.csv", "ratings.csv", "tags.csv"]
HOMEPAGE = "https://grouplens.org/datasets/movielens/latest/"  # ml-latest-small.zip, unzipped
NO_GENRES = "(no genres listed)"
TAG_SPEC = TextSpec(
    label="Tags", sep=", ", distinct=True, source="tags.csv (userId, movieId, tag, timestamp)"
)


def load(source: Path) -> Loaded:
    movies_p, ratings_p, tags_p = require_files(source, FILES, NAME, HOMEPAGE)
    movies = pd.read_csv(movies_p, dtype={"movieId": str, "title": str, "genres": str}, keep_default_na=False)
    tags = pd.read_csv(tags_p, dtype={"userId": str, "movieId": str, "tag": str}, keep_default_na=False)
    ratings = pd.read_csv(ratings_p, dtype={"userId": str, "movieId": str})

    tags = tags[tags["tag"].astype(str).str.strip() != ""]
    events = pd.DataFrame(
        {
            USER_ID: tags["userId"].astype(str),
            ITEM_ID: tags["movieId"].astype(str),
            TS: tags["timestamp"].astype("int64"),
            TEXT: tags["tag"].astype(str).str.strip(),
        }
    ).reset_index(drop=True)  # tags.csv order: the order the item text lists them

    genre_lists = [clean_labels(x for x in g.split("|") if x.strip() != NO_GENRES) for g in movies["genres"]]
    genres = [
        "" if g.strip() in ("", NO_GENRES) else ", ".join(x.strip() for x in g.split("|"))
        for g in movies["genres"].tolist()
    ]
    base = [
        join_text([title, f"Genres: {g}" if g else ""])
        for title, g in zip(movies["title"].tolist(), genres, strict=True)
    ]
    base_s = pd.Series(base, index=movies["movieId"].astype(str))
    texts = build_item_texts(base_s, events, TAG_SPEC)
    tag_str = build_item_texts(pd.Series("", index=base_s.index), events, TAG_SPEC).str.replace(
        "Tags: ", "", n=1, regex=False
    )
    items = pd.DataFrame(
        {
            ITEM_ID: movies["movieId"],
            TEXT: texts.to_numpy(),
            "title": movies["title"],
            "genres": genres,
            "tags": tag_str.to_numpy(),
            TEXT_BASE: base,
            FACETS: genre_lists,
        }
    )
    interactions = pd.DataFrame(
        {
            USER_ID: ratings["userId"],
            ITEM_ID: ratings["movieId"],
            TS: ratings["timestamp"],
            RATING: ratings["rating"].astype(np.float64),
            EVENT: "rating",
        }
    )
    logger.info(
        "movielens: %d movies (%d with tags), %d ratings",
        len(items),
        events[ITEM_ID].nunique(),
        len(interactions),
    )
    return Loaded(
        items=items,
        interactions=interactions,
        files=[movies_p, ratings_p, tags_p],
        facet_source="movies.csv genres (| separated; '(no genres listed)' dropped)",
        text_events=events,
        text_spec=TAG_SPEC,
    )
