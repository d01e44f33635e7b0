"""Synthetic catalog/interactions: seeded, valid canonical schema, and the planted structure is there."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from llmrec.data.catalog import validate_catalog, validate_interactions
from llmrec.data.synthetic import FILLER, TOPICS, make_catalog, make_interactions


@pytest.fixture(scope="module")
def data() -> tuple[pd.DataFrame, pd.DataFrame]:
    items = make_catalog(800, n_topics=8, seed=1)
    return items, make_interactions(items, 300, events_per_user=20, seed=2)


def test_seeded_and_valid(data: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    items, inter = data
    pd.testing.assert_frame_equal(items, make_catalog(800, n_topics=8, seed=1))
    pd.testing.assert_frame_equal(inter, make_interactions(items, 300, events_per_user=20, seed=2))
    assert not make_catalog(800, n_topics=8, seed=3)["text"].equals(items["text"])
    clean_items, rej = validate_catalog(items, "item_id", ["text"])
    assert len(rej) == 0 and len(clean_items) == 800
    clean, rej = validate_interactions(inter, items["item_id"])
    assert len(rej) == 0 and len(clean) == len(inter) == 300 * 20
    assert inter["ts"].dtype == np.int64 and inter["rating"].dtype == np.float64
    assert set(inter["event"]) <= {"view", "click", "like", "purchase", "rating"}
    r = inter["rating"]
    assert r.notna().eq(inter["event"] == "rating").all() and r.dropna().between(1, 5).all()


def test_text_carries_the_topic(data: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    items, _ = data
    names = list(TOPICS)[:8]
    vocab = [set(TOPICS[n]) for n in names]
    for text, t in zip(items["text"], items["topic"], strict=True):
        words = {w.strip(".,:").lower() for w in text.split()}
        own = len(words & vocab[t])
        assert own >= 1 and all(own > len(words & v) for j, v in enumerate(vocab) if j != t)
        assert words & set(FILLER)  # shared filler mixes in
    assert (items["topic"] == np.arange(800) % 8).all()


def test_planted_preferences_drift_and_popularity(data: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    items, inter = data
    topic = dict(zip(items["item_id"], items["topic"], strict=True))
    prefs = inter.attrs["user_topics"]
    inter = inter.assign(topic=inter["item_id"].map(topic))
    in_pref = [t in prefs[u] for u, t in zip(inter["user_id"], inter["topic"], strict=True)]
    assert np.mean(in_pref) > 0.85  # 90 % preferred by design, the rest noise
    assert all(1 <= len(p) <= 2 for p in prefs.values())
    # no repeats per user; ts strictly increasing per user
    assert not inter.duplicated(["user_id", "item_id"]).any()
    assert (inter.groupby("user_id")["ts"].diff().dropna() > 0).all()
    # drift: consecutive same-topic events sit closer on the topic's line than random same-topic pairs
    rank = {iid: k // 8 for k, iid in enumerate(items["item_id"])}  # position inside its topic
    inter = inter.assign(rank=inter["item_id"].map(rank))
    prev = inter.groupby("user_id")[["topic", "rank"]].shift()
    same = inter["topic"] == prev["topic"]
    step = (inter["rank"][same] - prev["rank"][same]).abs().median()
    rng = np.random.default_rng(0)
    rand = np.abs(rng.integers(0, 100, 5000) - rng.integers(0, 100, 5000))
    assert step < np.median(rand) / 3
    # popularity skew: the top 10 % of items get far more than 10 % of events
    counts = inter["item_id"].value_counts()
    assert counts.head(80).sum() / len(inter) > 0.2


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"n_topics must be in \[1, 16\]"):
        make_catalog(10, n_topics=17)
    with pytest.raises(ValueError, match="n_items must be >= 1"):
        make_catalog(0)
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['topic'\]"):
        make_interactions(pd.DataFrame({"item_id": ["a"]}), 3)
