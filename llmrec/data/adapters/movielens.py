"""MovieLens latest-small (ml-latest-small): movies.csv + tags.csv -> items, ratings.csv -> interactions.

Item text: "<title>. Genres: A, B. Tags: t1, t2." The tags are the movie's distinct user tags
(case-insensitive, first spelling kept, in order of first appearance in tags.csv); "(no genres listed)"
gives no genre part. Original fields kept: `title`, `genres` ("A, B"; "" when none), `tags` ("t1, t2").
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
from llmrec.schema import EVENT, FACETS, ITEM_ID, RATING, TEXT, TS, USER_ID

logger = logging.getLogger(__name__)

NAME = "movielens-latest-small"
FILES = ["movies.csv", "ratings.csv", "tags.csv"]
HOMEPAGE = "https://grouplens.org/datasets/movielens/latest/"  # ml-latest-small.zip, unzipped
NO_GENRES = "(no genres listed)"


def load(source: Path) -> Loaded:
    movies_p, ratings_p, tags_p = require_files(source, FILES, NAME, HOMEPAGE)
    movies = pd.read_csv(movies_p, dtype={"movieId": str, "title": str, "genres": str}, keep_default_na=False)
    tags = pd.read_csv(tags_p, dtype={"userId": str, "movieId": str, "tag": str}, keep_default_na=False)
    ratings = pd.read_csv(ratings_p, dtype={"userId": str, "movieId": str})

    movie_tags: dict[str, list[str]] = {}
    seen: dict[str, set[str]] = {}
    for mid, tag in zip(tags["movieId"].tolist(), tags["tag"].tolist(), strict=True):
        t = str(tag).strip()
        if not t:
            continue
        key = t.lower()
        if key not in seen.setdefault(mid, set()):
            seen[mid].add(key)
            movie_tags.setdefault(mid, []).append(t)

    genre_lists = [clean_labels(x for x in g.split("|") if x.strip() != NO_GENRES) for g in movies["genres"]]
    genres = [
        "" if g.strip() in ("", NO_GENRES) else ", ".join(x.strip() for x in g.split("|"))
        for g in movies["genres"].tolist()
    ]
    tag_str = [", ".join(movie_tags.get(m, [])) for m in movies["movieId"].tolist()]
    texts = [
        join_text([title, f"Genres: {g}" if g else "", f"Tags: {t}" if t else ""])
        for title, g, t in zip(movies["title"].tolist(), genres, tag_str, strict=True)
    ]
    items = pd.DataFrame(
        {
            ITEM_ID: movies["movieId"],
            TEXT: texts,
            "title": movies["title"],
            "genres": genres,
            "tags": tag_str,
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
        "movielens: %d movies (%d with tags), %d ratings", len(items), len(movie_tags), len(interactions)
    )
    return Loaded(
        items=items,
        interactions=interactions,
        files=[movies_p, ratings_p, tags_p],
        facet_source="movies.csv genres (| separated; '(no genres listed)' dropped)",
    )
