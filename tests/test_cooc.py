"""Item co-occurrence similarity and the scorer's co-occurrence term, against dense brute force."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from llmrec.cooc import cooccurrence_similarity, history_scores
from llmrec.protocol import ItemSpace
from llmrec.schema import EVENT, ITEM_ID, RATING, TS, USER_ID
from llmrec.scorer.data import build_validation
from llmrec.scorer.finalize import COOC_GRID, cooc_matrix, tune_behaviour
from llmrec.scorer.model import ScorerConfig, ScorerModel


def _dense_cosine(users: np.ndarray, items: np.ndarray, n: int) -> np.ndarray:
    x = np.zeros((users.max() + 1, n))
    x[users, items] = 1.0
    co = x.T @ x
    cnt = x.sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        sim = np.where(np.outer(cnt, cnt) > 0, co / np.sqrt(np.outer(cnt, cnt)), 0.0)
    np.fill_diagonal(sim, 0.0)
    return sim


def test_similarity_equals_dense_cosine_and_keeps_the_top_neighbours():
    rng = np.random.default_rng(0)
    n = 30
    users = rng.integers(0, 40, 400)
    items = rng.integers(0, n, 400)
    ref = _dense_cosine(users, items, n)
    full = cooccurrence_similarity(users, items, n, n_neighbors=n, block_items=7).toarray()
    np.testing.assert_allclose(full, ref, rtol=1e-5, atol=1e-7)
    top3 = cooccurrence_similarity(users * 7 + 1, items, n, n_neighbors=3, block_items=4).toarray()  # any ids
    for i in range(n):
        kept = top3[i][top3[i] > 0]
        assert len(kept) <= 3
        np.testing.assert_allclose(np.sort(kept), np.sort(ref[i])[::-1][: len(kept)][::-1], rtol=1e-5)
        np.testing.assert_allclose(top3[i][top3[i] > 0], ref[i][top3[i] > 0], rtol=1e-5)


def test_counts_summed_over_chunks_equal_the_one_shot_similarity():
    """CoocCounts, fed users a few at a time with a tiny chunk (many partial sums), gives the dense cosine."""
    from llmrec.cooc import CoocCounts

    rng = np.random.default_rng(3)
    n = 25
    users = rng.integers(0, 60, 500)
    items = rng.integers(0, n, 500)
    ref = _dense_cosine(users, items, n)
    acc = CoocCounts(n, chunk_events=37)
    ids = np.unique(users)
    for start in range(0, len(ids), 9):
        acc.add([items[users == u] for u in ids[start : start + 9]])  # repeats within a user count once
    np.testing.assert_allclose(acc.similarity(n_neighbors=n, block_items=6).toarray(), ref, rtol=1e-5,
                               atol=1e-7)
    top4 = acc.similarity(n_neighbors=4).toarray()
    np.testing.assert_allclose(top4, cooccurrence_similarity(users, items, n, n_neighbors=4).toarray(),
                               rtol=1e-6)
    with pytest.raises(ValueError, match=r"items must lie in \[0, 25\)"):
        bad = CoocCounts(n)
        bad.add([np.array([3, 25])])
        bad.similarity()


def test_history_scores_sum_the_rows_of_distinct_history_items():
    rng = np.random.default_rng(1)
    n = 12
    sim = sp.random(n, n, density=0.4, random_state=1, dtype=np.float32).tocsr()
    hists = [np.array([3, 3, 5]), np.array([], dtype=np.int64), np.array([0, 11])]
    cand = rng.integers(0, n, (3, 4))
    got = history_scores(sim, hists, cand)
    dense = sim.toarray()
    for b, h in enumerate(hists):
        ref = dense[np.unique(h)][:, cand[b]].sum(0) if len(h) else np.zeros(4)
        np.testing.assert_allclose(got[b], ref, rtol=1e-6)


def test_ease_weights_equal_the_ease_baseline_and_keep_the_top_entries():
    """ease_weights from streamed co-occurrence counts equals the weights B of the EASE baseline fit on the
    same events (its own direct inverse over a users x items matrix), positive entries only; items without
    events have no entries; the top-k form keeps each row's k largest."""
    from llmrec.cooc import CoocCounts, ease_weights
    from llmrec.eval.baselines import EASERecommender

    rng = np.random.default_rng(5)
    n, l2 = 30, 10.0
    users = rng.integers(0, 80, 700)
    items = rng.integers(0, n - 3, 700)  # items 27-29 have no events
    df = pd.DataFrame({USER_ID: [f"u{u}" for u in users], ITEM_ID: [f"i{i}" for i in items],
                       TS: np.arange(len(users)), RATING: np.nan, EVENT: "click", "item_idx": items})
    space = ItemSpace(np.array([f"i{i}" for i in range(n)]), rng.normal(size=(n, 4)).astype(np.float32))
    base = EASERecommender(l2=l2)
    base.fit(df, space)
    ref = np.zeros((n, n))
    ref[np.ix_(base.cols, base.cols)] = base.b
    counts = CoocCounts(n, chunk_events=50)
    for u in np.unique(users):
        counts.add([items[users == u]])
    counts._flush()
    got = ease_weights(counts.counts, l2, n_neighbors=n).toarray()
    np.testing.assert_allclose(got, np.where(ref > 0, ref, 0.0), rtol=1e-4, atol=1e-6)
    assert (got > 0).sum() > n and not got[27:].any() and not got[:, 27:].any()
    top4 = counts.matrix("ease:l2=10", n_neighbors=4).toarray()
    for i in range(n):
        kept = top4[i][top4[i] > 0]
        assert len(kept) == min(4, int((ref[i] > 0).sum()))
        np.testing.assert_allclose(np.sort(kept), np.sort(ref[i])[::-1][: len(kept)][::-1], rtol=1e-4)
    with pytest.raises(ValueError, match="EASE l2 must be > 0, got 0"):
        ease_weights(counts.counts, 0.0)


def test_spd_inverse_equals_the_lu_inverse_and_falls_back_on_a_matrix_that_is_not_positive_definite(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """EASE's inverse by Cholesky (`spd_inverse`) against numpy's LU inverse on G + l2 I of a random binary
    matrix (and A P = I); the input is left as it was; a symmetric matrix that is not positive definite
    (Cholesky fails) is still inverted, by LU, with a warning; a non-square one is refused."""
    import logging

    from llmrec.cooc import spd_inverse

    rng = np.random.default_rng(11)
    x = (rng.random((40, 25)) < 0.2).astype(np.float64)
    g = x.T @ x + 3.0 * np.eye(25)
    before = g.copy()
    p = spd_inverse(g)
    np.testing.assert_array_equal(g, before)
    np.testing.assert_allclose(p, np.linalg.inv(g), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(p, p.T, rtol=0, atol=0)
    np.testing.assert_allclose(g @ p, np.eye(25), atol=1e-10)
    indefinite = np.array([[1.0, 2.0], [2.0, 1.0]])  # eigenvalues 3 and -1
    with caplog.at_level(logging.WARNING, logger="llmrec.cooc"):
        np.testing.assert_allclose(spd_inverse(indefinite), np.linalg.inv(indefinite), rtol=1e-12)
    assert "Cholesky of a 2 x 2 matrix failed" in caplog.text
    with pytest.raises(ValueError, match=r"square matrix, got shape \(2, 3\)"):
        spd_inverse(np.zeros((2, 3)))


def test_candidate_terms_follow_the_kind_and_the_catalog_size():
    from llmrec.cooc import EASE_L2_GRID, EASE_MAX_ITEMS, candidate_terms, term_l2

    ease = [f"ease:l2={x:g}" for x in EASE_L2_GRID]
    assert candidate_terms("auto", 100) == ["itemknn", *ease]
    assert candidate_terms("auto", EASE_MAX_ITEMS + 1) == ["itemknn"]
    assert candidate_terms("itemknn", 100) == ["itemknn"] and candidate_terms("ease", 100) == ease
    assert [term_l2(t) for t in ease] == list(EASE_L2_GRID) and term_l2("itemknn") is None
    with pytest.raises(ValueError, match=f"at most {EASE_MAX_ITEMS} items, this catalog has"):
        candidate_terms("ease", EASE_MAX_ITEMS + 1)
    for bad in ("ease:l2=0", "ease:l2=x", "knn"):
        with pytest.raises(ValueError, match="a co-occurrence term is 'itemknn' or 'ease:l2="):
            term_l2(bad)


def _pairs_data(n_pairs: int = 20, n_users: int = 200, seed: int = 0):
    """Items come in pairs (2p, 2p+1); a user buys one item of a pair, then its partner. Text vectors are
    random, so the text model knows nothing of the pairs while co-occurrence knows them exactly."""
    rng = np.random.default_rng(seed)
    n = 2 * n_pairs
    text = rng.normal(size=(n, 8))
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    rows = []
    for u in range(n_users):
        p = rng.integers(n_pairs)
        a, b = (2 * p, 2 * p + 1) if rng.random() < 0.5 else (2 * p + 1, 2 * p)
        rows += [(f"u{u}", f"i{a}", 1, np.nan, "click"), (f"u{u}", f"i{b}", 2, np.nan, "click")]
    df = pd.DataFrame(rows, columns=[USER_ID, ITEM_ID, TS, RATING, EVENT])
    items = ItemSpace(np.array([f"i{i}" for i in range(n)]), text.astype(np.float32))
    return items, df


def _pairs_validation():
    """(items, train frame, validation set, text-only warm-started model) of `_pairs_data`: 150 users train;
    the others are validation users, history = their first item, target = its partner."""
    items, df = _pairs_data()
    train_users = [f"u{u}" for u in range(150)]
    train = df[df[USER_ID].isin(train_users)]
    rest = df[~df[USER_ID].isin(train_users)]
    first, last = rest[rest[TS] == 1], rest[rest[TS] == 2]
    val = build_validation(pd.concat([train, first]), last, items, max_len=4)
    torch.manual_seed(0)
    cfg = ScorerConfig(text_dim=8, n_items=items.n_items, n_id_slots=1, dim=8, max_len=4, rerank=False)
    model = ScorerModel(
        cfg, torch.from_numpy(items.text_vectors), torch.zeros(items.n_items, dtype=torch.long)
    )
    model.warm_start()  # u.v = text cosine-like scores, in [-1, 1] for unit vectors
    return items, train, val, model


def test_tune_behaviour_picks_the_co_occurrence_term_when_it_carries_the_signal():
    items, train, val, model = _pairs_validation()
    sim = cooc_matrix(train, items, n_neighbors=10)
    term, w, tables = tune_behaviour(model, val, {"itemknn": sim}, n_candidates=items.n_items - 1)
    table = tables["itemknn"]
    assert term == "itemknn" and w > 0 and len(table) == len(COOC_GRID)
    assert table[f"{w:.6g}"] == 1.0  # the partner is always first
    assert table["0"] < 0.5  # random text vectors alone
    # no co-occurrence signal at all: every weight ranks alike and the tie goes to weight 0
    _, w0, tables0 = tune_behaviour(
        model, val, {"itemknn": sp.csr_matrix((items.n_items, items.n_items))}, items.n_items - 1
    )
    assert w0 == 0.0 and len(set(tables0["itemknn"].values())) == 1


def test_tune_behaviour_picks_the_term_that_carries_the_signal_and_ties_go_to_the_first():
    items, train, val, model = _pairs_validation()
    ease = cooc_matrix(train, items, n_neighbors=10, term="ease:l2=1")
    empty = sp.csr_matrix((items.n_items, items.n_items), dtype=np.float32)
    term, w, tables = tune_behaviour(model, val, {"itemknn": empty, "ease:l2=1": ease}, items.n_items - 1)
    assert term == "ease:l2=1" and w > 0 and tables[term][f"{w:.6g}"] == 1.0  # the partner is always first
    assert len(set(tables["itemknn"].values())) == 1  # the empty term ranks like weight 0 at every weight
    knn = cooc_matrix(train, items, n_neighbors=10)
    term2, w2, tables2 = tune_behaviour(model, val, {"itemknn": knn, "ease:l2=1": ease}, items.n_items - 1)
    assert term2 == "itemknn" and tables2["ease:l2=1"][f"{w2:.6g}"] == 1.0  # both perfect: the first wins
    assert tune_behaviour(model, val, {"itemknn": knn}, items.n_items - 1) == (
        "itemknn", w2, {"itemknn": tables2["itemknn"]}
    )  # a term's table does not depend on the other terms tried


def test_scorer_adds_the_weighted_co_occurrence_term_and_can_leave_it_out():
    import dataclasses

    import pytest

    from llmrec.protocol import History
    from llmrec.scorer.inference import Scorer

    torch.manual_seed(0)
    n, w = 40, 0.7
    cfg = ScorerConfig(text_dim=8, n_items=n, n_id_slots=n + 1, dim=8, max_len=5, rerank=False, cooc_weight=w)
    model = ScorerModel(cfg, torch.randn(n, 8), torch.arange(1, n + 1)).eval()
    plain = ScorerModel(dataclasses.replace(cfg, cooc_weight=0.0), model.text_vectors, model.id_slots).eval()
    plain.load_state_dict(model.state_dict())
    sim = sp.random(n, n, density=0.3, random_state=2, dtype=np.float32).tocsr()
    ids = np.array([f"i{i}" for i in range(n)])
    s, s0 = Scorer(model, ids, cooc=sim), Scorer(plain, ids)
    rng = np.random.default_rng(0)
    hists = [
        History(f"u{b}", rng.choice(n, 4, replace=False), np.arange(4),
                np.array(["click", "dislike", "click", "view"]), np.full(4, np.nan))
        for b in range(3)
    ]
    idx, sc = s.recommend(hists, k=5, n_candidates=15)
    U, V, dense = s.user_vectors(hists), s.item_vectors(), sim.toarray()
    for b, h in enumerate(hists):
        ret = U[b] @ V.T
        ret[h.item_idx] = -np.inf
        cand = np.argsort(-ret, kind="stable")[:15]
        pos = h.item_idx[h.event != "dislike"]  # a disliked item adds no co-occurrence
        ref = ret[cand] + w * dense[pos][:, cand].sum(0)
        order = np.argsort(-ref, kind="stable")[:5]
        np.testing.assert_array_equal(idx[b], cand[order])
        np.testing.assert_allclose(sc[b], ref[order], rtol=1e-5)
    np.testing.assert_allclose(s.full_scores(hists, 15, use_cooc=False), s0.full_scores(hists, 15), rtol=1e-6)
    assert not np.allclose(s.full_scores(hists, 15), s0.full_scores(hists, 15))
    with pytest.raises(ValueError, match="no co-occurrence matrix"):
        Scorer(model, ids)


def test_cold_candidates_score_their_text_neighbours_co_occurrence():
    """impute: a candidate without co-occurrence data scores the softmax(cos / 0.05)-weighted sum of its k
    nearest (by text) items' co-occurrence scores with the history; other candidates keep their own."""
    from llmrec.cooc import cooccurrence_similarity, history_scores
    from llmrec.scorer.model import COLD_TEMPERATURE, cooc_neighbours

    rng = np.random.default_rng(0)
    n, D, k = 12, 6, 3
    text = rng.normal(size=(n, D))
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    users = np.repeat(np.arange(30), 3)
    items = rng.integers(0, 9, size=90)  # items 9..11 never occur: no co-occurrence data
    sim = cooccurrence_similarity(users, items, n, n_neighbors=5)
    text[11] = text[4]  # cold item 11 reads exactly like item 4, which user 1 has: it scores what 4 would
    imp = cooc_neighbours(sim, text.astype(np.float32), k)
    hist = [np.array([0, 1]), np.array([4])]
    cand = np.array([[2, 9, 10], [11, 3, 5]])
    plain = history_scores(sim, hist, cand)
    got = history_scores(sim, hist, cand, impute=imp)
    dense = sim.toarray()
    warm = np.flatnonzero((dense.sum(0) > 0) | (dense.sum(1) > 0))
    for b in range(2):
        full = dense[hist[b]].sum(0)
        for j, c in enumerate(cand[b]):
            if c < 9:
                assert got[b, j] == pytest.approx(plain[b, j]) == pytest.approx(full[c])
                continue
            sims = text[warm] @ text[c]
            top = np.argsort(-sims)[:k]
            w = np.exp((sims[top] - sims[top].max()) / COLD_TEMPERATURE)
            ref = float((w * full[warm[top]]).sum() / w.sum())
            assert got[b, j] == pytest.approx(ref, rel=1e-4, abs=1e-6)
            assert plain[b, j] == 0.0
    # the duplicate of the history item is a weighted mean of candidate scores (the item itself adds its
    # diagonal entry, 0): no self-similarity lifts it above the best-scoring warm item
    assert 0.0 <= got[1, 0] <= dense[hist[1]].sum(0).max()
