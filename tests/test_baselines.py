"""Baselines on a small seeded planted data set: each beats random; ID models can't score cold items."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from llmrec.data.histories import attach_item_idx, make_histories
from llmrec.eval.baselines import (
    ALSRecommender,
    BPRRecommender,
    EASERecommender,
    ItemKNNRecommender,
    PopularityRecommender,
    SASRecRecommender,
    ZeroShotTextRecommender,
)
from llmrec.eval.evaluate import evaluate_models
from llmrec.eval.split import leave_last_out
from llmrec.protocol import ItemSpace

N_CLUSTERS, PER_CLUSTER, N_COLD, DIM = 3, 20, 4, 16


def planted(seed: int = 0, n_users: int = 150, seq_len: int = 10) -> tuple[ItemSpace, pd.DataFrame]:
    """3 clusters of 20 items; a user walks its cluster in a fixed cyclic order from a random start.

    Text vectors = cluster centroid + noise, so text similarity knows the clusters; 4 extra items (one or two
    per cluster) never occur in any interaction: cold items.
    """
    rng = np.random.default_rng(seed)
    n_warm = N_CLUSTERS * PER_CLUSTER
    centroids = rng.normal(size=(N_CLUSTERS, DIM))
    cluster_of = np.r_[np.repeat(np.arange(N_CLUSTERS), PER_CLUSTER), np.arange(N_COLD) % N_CLUSTERS]
    vecs = centroids[cluster_of] + 0.3 * rng.normal(size=(n_warm + N_COLD, DIM))
    vecs = (vecs / np.linalg.norm(vecs, axis=1, keepdims=True)).astype(np.float32)
    ids = np.array([f"i{j:03d}" for j in range(n_warm + N_COLD)], dtype=object)
    rows = []
    for u in range(n_users):
        c, start = rng.integers(N_CLUSTERS), rng.integers(PER_CLUSTER)
        for t in range(seq_len):
            rows.append((f"u{u:03d}", ids[c * PER_CLUSTER + (start + t) % PER_CLUSTER], 1000 * u + t))
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "ts"]).assign(rating=np.nan, event="view")
    return ItemSpace(item_ids=ids, text_vectors=vecs), df


class RandomRecommender:
    name = "random"

    def fit(self, train: pd.DataFrame, items: ItemSpace) -> None:
        self.n = items.n_items

    def score(self, histories):
        return np.random.default_rng(0).random((len(histories), self.n)).astype(np.float32)


@pytest.fixture(scope="module")
def planted_results():
    space, df = planted()
    inter = attach_item_idx(df, space)  # raises on an item outside the space
    split = leave_last_out(inter)
    models = [
        RandomRecommender(),
        PopularityRecommender(),
        ItemKNNRecommender(n_neighbors=20),
        ALSRecommender(factors=8, iterations=10, seed=0),
        BPRRecommender(factors=16, learning_rate=0.05, iterations=100, seed=0),
        EASERecommender(l2=10.0),
        SASRecRecommender(
            dim=32,
            n_blocks=1,
            max_len=12,
            epochs=40,
            batch_size=32,
            lr=5e-3,
            dropout=0.1,
            seed=0,
            num_threads=1,
        ),
        ZeroShotTextRecommender(),
    ]
    res, timings, n_users = evaluate_models(split, space, models)
    return space, split, models, res, n_users


def test_every_model_beats_random(planted_results) -> None:
    _, _, _, res, n_users = planted_results
    assert n_users == 150
    rnd = res["models"]["random"]["recall@10"]
    assert rnd < 0.35  # ~10/55 expected
    for name in ("itemknn", "als", "ease", "bpr", "sasrec", "zeroshot_text"):
        assert res["models"][name]["recall@10"] > max(2 * rnd, 0.5), (name, res["models"][name], rnd)
        assert res["models"][name]["ndcg@10"] > res["models"]["random"]["ndcg@10"]
    # the next item in the walk is fully predictable from order: the sequential model should nail it
    assert res["models"]["sasrec"]["mrr"] > 0.5, res["models"]["sasrec"]


def test_id_models_cannot_score_cold_items(planted_results) -> None:
    space, split, models, _, _ = planted_results
    hist = make_histories(split.history, sorted(split.test.user_id)[:5])
    cold = np.arange(space.n_items - N_COLD, space.n_items)
    for m in models:
        s = m.score(hist)
        assert s.shape == (5, space.n_items) and s.dtype == np.float32
        if m.name in ("popularity", "itemknn", "als", "bpr", "ease", "sasrec"):
            assert np.isneginf(s[:, cold]).all(), m.name
            assert np.isfinite(s[:, : space.n_items - N_COLD]).all(), m.name
        elif m.name == "zeroshot_text":
            assert np.isfinite(s[:, cold]).all()


def test_popularity_ranking_is_hand_checkable() -> None:
    ids = np.array(["a", "b", "c", "d"], dtype=object)
    space = ItemSpace(item_ids=ids, text_vectors=np.eye(4, dtype=np.float32))
    df = pd.DataFrame(
        {
            "user_id": ["u1", "u1", "u2", "u2", "u3", "u3"],
            "item_id": ["b", "c", "b", "c", "b", "a"],
            "ts": [1, 2, 1, 2, 1, 2],
            "rating": np.nan,
            "event": ["view", "view", "view", "dislike", "view", "view"],
        }
    )
    inter = attach_item_idx(df, space)
    m = PopularityRecommender()
    m.fit(inter, space)
    s = m.score(make_histories(inter, ["u1"]))[0]
    # b: 3 views, c: 1 view (+1 dislike, not positive), a: 1, d: never seen -> -inf
    assert s.tolist()[:3] == [1.0, 3.0, 1.0] and np.isneginf(s[3])


def test_itemknn_matches_dense_cosine() -> None:
    space, df = planted(seed=1, n_users=40)
    inter = attach_item_idx(df, space)
    m = ItemKNNRecommender(n_neighbors=space.n_items, block_items=7)  # no pruning, odd blocks
    m.fit(inter, space)
    x = np.zeros((40, space.n_items))
    x[pd.factorize(inter.user_id)[0], inter.item_idx] = 1
    co = x.T @ x
    n = np.sqrt(np.diag(co))
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = np.where(np.outer(n, n) > 0, co / np.outer(n, n), 0)
    np.fill_diagonal(cos, 0)
    np.testing.assert_allclose(m.sim.toarray(), cos, atol=1e-6)


def test_als_fold_in_matches_implicit_recalculate_user() -> None:
    space, df = planted(seed=2, n_users=60)
    inter = attach_item_idx(df, space)
    m = ALSRecommender(factors=8, iterations=5, seed=0)
    m.fit(inter, space)
    users = sorted(inter.user_id.unique())[:10]
    mine = m.user_factors(make_histories(inter, users))
    ui = inter[inter.user_id.isin(users)].drop_duplicates(["user_id", "item_idx"])
    rows = ui.user_id.map({u: i for i, u in enumerate(users)}).to_numpy()
    mat = sp.csr_matrix(
        (np.ones(len(ui), np.float32), (rows, ui.item_idx.to_numpy())), shape=(10, space.n_items)
    )
    ref = m.model.recalculate_user(np.arange(10), mat)
    np.testing.assert_allclose(mine, ref, rtol=1e-3, atol=1e-4)


def test_training_is_seeded() -> None:
    space, df = planted(seed=3, n_users=30)
    inter = attach_item_idx(df, space)
    hist = make_histories(inter, ["u000", "u001"])
    for make in (
        lambda: ALSRecommender(factors=4, iterations=3, seed=7),
        lambda: BPRRecommender(factors=4, iterations=5, seed=7),
        lambda: SASRecRecommender(dim=16, n_blocks=1, max_len=12, epochs=2, seed=7, num_threads=1),
    ):
        a, b = make(), make()
        a.fit(inter, space)
        b.fit(inter, space)
        np.testing.assert_array_equal(a.score(hist), b.score(hist))


def test_zeroshot_recency_weighting_by_hand() -> None:
    ids = np.array(["a", "b", "c"], dtype=object)
    space = ItemSpace(item_ids=ids, text_vectors=np.eye(3, dtype=np.float32))
    df = pd.DataFrame(
        {
            "user_id": ["u", "u"],
            "item_id": ["a", "b"],
            "ts": [1, 2],
            "rating": np.nan,
            "event": ["view", "view"],
        }
    )
    inter = attach_item_idx(df, space)
    m = ZeroShotTextRecommender(half_life=1.0)
    m.fit(inter, space)
    s = m.score(make_histories(inter, ["u"]))[0]
    w = np.array([0.5, 1.0])  # a is one step older than b
    np.testing.assert_allclose(s, np.r_[w / np.linalg.norm(w), 0.0], atol=1e-6)


def test_new_first_text_ranks_every_item_without_a_train_event_first_then_by_cosine() -> None:
    """zeroshot_text_new (the cold protocol's reference for a model told that the next item is new): the
    items that never occur in train (the 4 planted cold items) fill the top of every list, in zero-shot text's
    order, and the seen items follow in that same order."""
    from llmrec.eval.baselines import NewFirstTextRecommender

    space, df = planted()
    inter = attach_item_idx(df, space)
    hists = make_histories(inter)[:20]
    text, new_first = ZeroShotTextRecommender(half_life=3.0), NewFirstTextRecommender(half_life=3.0)
    text.fit(inter, space)
    new_first.fit(inter, space)
    cold = np.arange(space.n_items - N_COLD, space.n_items)
    np.testing.assert_array_equal(np.flatnonzero(new_first.new), cold)
    ref, got = text.score(hists), new_first.score(hists)
    for b in range(len(hists)):
        order = np.argsort(-ref[b], kind="stable")
        want = np.r_[order[np.isin(order, cold)], order[~np.isin(order, cold)]]
        np.testing.assert_array_equal(np.argsort(-got[b], kind="stable"), want)
    np.testing.assert_allclose(got[:, : -N_COLD], ref[:, : -N_COLD])  # seen items: zero-shot's scores


def test_empty_and_unknown_histories_give_finite_scores(planted_results) -> None:
    from llmrec.protocol import History

    space, _, models, _, _ = planted_results
    cold = space.n_items - 1  # a history made only of a never-trained item is "empty" for ID models
    hists = [
        History("new", np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, object), np.zeros(0)),
        History("coldonly", np.array([cold]), np.array([1]), np.array(["view"], object), np.array([np.nan])),
    ]
    for m in models:
        s = m.score(hists)
        assert not np.isnan(s).any(), m.name
        assert np.isfinite(s[:, : space.n_items - N_COLD]).all(), m.name


def test_one_table_of_model_names() -> None:
    """The baselines table is the one source of the names: each name builds the model that reports it, the
    order is today's, ALL_MODELS is llmrec + it + the hybrids, and `llmrec evaluate --help` lists exactly
    ALL_MODELS (and FAST_MODELS for --fast)."""
    import argparse

    from llmrec.commands import evaluate as cmd
    from llmrec.eval.baselines import BASELINES, make_baseline
    from llmrec.eval.models import ALL_MODELS, FAST_MODELS, HYBRIDS

    assert BASELINES == (
        "popularity", "itemknn", "als", "bpr", "ease", "sasrec", "zeroshot_text", "served_text",
        "zeroshot_text_new"
    )
    for name in BASELINES:
        assert make_baseline(name, seed=3).name == name
    with pytest.raises(ValueError, match=r"unknown baseline 'nope'; choose from \['popularity'"):
        make_baseline("nope")
    assert ALL_MODELS == ("llmrec", *BASELINES, *HYBRIDS)
    from llmrec.commands import recommend

    assert set(recommend.MODELS) <= set(ALL_MODELS)  # `llmrec recommend --model` offers a subset of them

    p = argparse.ArgumentParser()
    cmd.add_arguments(p)
    text = next(a.help for a in p._actions if a.dest == "models")
    listed, fast = text.split(" (default all; --fast: ")
    assert tuple(listed.removeprefix("comma list of ").split(",")) == ALL_MODELS
    assert tuple(fast.removesuffix(" + hybrids)").split(",")) + HYBRIDS == FAST_MODELS
