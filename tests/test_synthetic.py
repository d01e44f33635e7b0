"""Synthetic catalog/interactions: seeded, valid canonical schema, and the planted structure is there."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from llmrec.data.catalog import validate_catalog, validate_interactions
from llmrec.data.synthetic import FILLER, TOPICS, make_catalog, make_interactions, write_sharded


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


# ------------------------------------------------------------ write_sharded: any size, one shard at a time


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("syn") / "syn"
    return out, write_sharded(out, n_items=4000, n_users=600, n_events=12000, n_shards=3, n_topics=8, seed=5)


def test_sharded_files_are_seeded_and_valid(sharded: tuple[Path, dict], tmp_path: Path) -> None:
    out, info = sharded
    for table in ("items", "interactions", "truth"):
        assert sorted(p.name for p in (out / table).iterdir()) == [f"part-0000{k}.parquet" for k in range(3)]
    items, inter = pd.read_parquet(out / "items"), pd.read_parquet(out / "interactions")
    assert (info["n_items"], info["n_users"], info["n_events"], info["n_events_requested"]) == (
        4000,
        600,
        12000,
        12000,
    )
    assert info["n_repeats_dropped"] == 0 and json.loads((out / "synthetic.json").read_text()) == info
    # the items are make_catalog's rows (same texts builder, global ids), with facets = [topic name]
    assert list(items["item_id"]) == [f"i{i:05d}" for i in range(4000)]
    assert (items["topic"] == np.arange(4000) % 8).all()
    assert [list(f) for f in items["facets"]] == [[t] for t in items["topic_name"]]
    names = list(TOPICS)[:8]
    for text, t in zip(items["text"][:500], items["topic"][:500], strict=True):
        words = {w.strip(".,:").lower() for w in text.split()}
        own = len(words & set(TOPICS[names[t]]))
        assert own >= 1 and all(own > len(words & set(TOPICS[n])) for j, n in enumerate(names) if j != t)
    clean, rej = validate_interactions(inter, items["item_id"])
    assert len(rej) == 0 and len(clean) == 12000 and inter["ts"].dtype == np.int64
    # each user lives in one shard, events contiguous and rising in time; no repeated item per user
    per_file = [
        set(pd.read_parquet(p, columns=["user_id"])["user_id"])
        for p in sorted((out / "interactions").iterdir())
    ]
    assert sum(len(s) for s in per_file) == 600 == len(set().union(*per_file))
    assert (inter.groupby("user_id")["ts"].diff().dropna() > 0).all()
    assert not inter.duplicated(["user_id", "item_id"]).any()
    # the same seed writes the same data; another seed does not
    again = write_sharded(tmp_path / "again", 4000, 600, 12000, n_shards=3, n_topics=8, seed=5)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "again" / "interactions"), inter)
    assert again["n_events"] == 12000
    write_sharded(tmp_path / "other", 4000, 600, 12000, n_shards=3, n_topics=8, seed=6)
    assert not pd.read_parquet(tmp_path / "other" / "interactions")["item_id"].equals(inter["item_id"])


def test_sharded_planted_structure(sharded: tuple[Path, dict]) -> None:
    out, _ = sharded
    inter = pd.read_parquet(out / "interactions")
    truth = pd.read_parquet(out / "truth")
    prefs = {u: set(t) for u, t in zip(truth["user_id"], truth["topics"], strict=True)}
    assert all(1 <= len(p) <= 2 for p in prefs.values()) and len(prefs) == 600
    topic = inter["item_id"].str[1:].astype(int) % 8
    in_pref = [t in prefs[u] for u, t in zip(inter["user_id"], topic, strict=True)]
    assert np.mean(in_pref) > 0.85  # 90 % preferred by design
    # activity is heavy-tailed, every user has an event
    per_user = inter["user_id"].value_counts()
    assert per_user.min() >= 1 and per_user.max() > 4 * per_user.mean()
    # popularity skew: the top 10 % of items get far more than 10 % of the events
    assert inter["item_id"].value_counts().head(400).sum() / len(inter) > 0.2
    # drift: consecutive same-topic events sit closer on the topic's line than random pairs (line size 500)
    pos = inter["item_id"].str[1:].astype(int) // 8
    prev_t, prev_p = topic.groupby(inter["user_id"]).shift(), pos.groupby(inter["user_id"]).shift()
    same = topic == prev_t
    step = (pos[same] - prev_p[same]).abs()
    step = np.minimum(step, 500 - step)  # the line wraps around
    assert step.median() < 125 / 3  # random pairs on a 500-circle: median 125
    # ratings: higher on preferred topics
    r = inter.assign(pref=in_pref).dropna(subset=["rating"])
    assert r["rating"].between(1, 5).all() and r.groupby("pref")["rating"].mean()[True] > 3.5


def test_sharded_output_is_a_generic_prepare_input(sharded: tuple[Path, dict], tmp_path: Path) -> None:
    from llmrec.data.prepare import prepare

    out, _ = sharded
    meta = prepare("generic", out, tmp_path / "data", items="items", interactions="interactions")
    assert (meta["n_items"], meta["n_users"], meta["n_interactions"], meta["n_rejected"]) == (
        4000,
        600,
        12000,
        0,
    )
    assert meta["facets"]["n_distinct"] == 8 and len(meta["files"]) == 6
    got = pd.read_parquet(tmp_path / "data" / "items.parquet")
    assert list(got["item_id"]) == list(pd.read_parquet(out / "items")["item_id"])


def test_sharded_cli_and_bad_sizes(tmp_path: Path, capsys) -> None:
    from llmrec.data.synthetic import main

    assert (
        main(
            [
                "--items",
                "50",
                "--users",
                "10",
                "--events",
                "40",
                "--out",
                str(tmp_path / "s"),
                "--shards",
                "2",
                "--topics",
                "4",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["n_events"] == 40
    assert len(pd.read_parquet(tmp_path / "s" / "interactions")) == 40
    with pytest.raises(ValueError, match="n_events >= n_users"):
        write_sharded(tmp_path / "x", n_items=50, n_users=10, n_events=5)
    with pytest.raises(ValueError, match=r"n_shards must be in \[1, min\(n_items, n_users\)\]"):
        write_sharded(tmp_path / "x", n_items=50, n_users=10, n_events=50, n_shards=11)
