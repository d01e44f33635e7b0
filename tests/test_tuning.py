"""Tuning like llmrec and the protocol pieces around it, each against a hand-built reference: EASE and shrunk
item-kNN against dense formulas, the validation split against llmrec's own, grid choice and refit,
hybrids, the item text visible before a split's cutoff (and its re-embedding), the time protocol where ts is
an order."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from llmrec.cooc import cooccurrence_similarity
from llmrec.data.histories import attach_item_idx, make_histories
from llmrec.data.order import sample_rows, split_last_event
from llmrec.eval.baselines import EASERecommender, ItemKNNRecommender, shrunk_cosine_similarity
from llmrec.eval.evaluate import evaluate
from llmrec.eval.split import cold_item_split, leave_last_out, time_split, visible_text_events
from llmrec.eval.tuning import GRIDS, Hybrid, InnerValidation, Tuned, combine_scores
from llmrec.protocol import ItemSpace


def _binary(n_users: int, n_items: int, seed: int) -> tuple[pd.DataFrame, ItemSpace, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = (rng.random((n_users, n_items)) < 0.3).astype(np.float64)
    x[np.arange(n_users), rng.integers(0, n_items, n_users)] = 1.0  # every user has an event
    x[0, :] = 1.0  # every item is known
    u, i = np.nonzero(x)
    ids = np.array([f"i{j}" for j in range(n_items)], dtype=object)
    df = pd.DataFrame(
        {
            "user_id": [f"u{k:03d}" for k in u],
            "item_id": ids[i],
            "ts": np.arange(len(u)),
            "rating": np.nan,
            "event": "view",
        }
    )
    space = ItemSpace(item_ids=ids, text_vectors=np.eye(n_items, dtype=np.float32))
    return attach_item_idx(df, space), space, x


@pytest.mark.parametrize(("n_users", "n_items"), [(8, 20), (40, 12)])  # Woodbury (U < K) and direct inverse
def test_ease_equals_its_closed_form(n_users: int, n_items: int) -> None:
    inter, space, x = _binary(n_users, n_items, seed=n_users)
    lam = 3.0
    p = np.linalg.inv(x.T @ x + lam * np.eye(n_items))
    b = np.eye(n_items) - p / np.diag(p)[None, :]  # Steck: B = I - P diag(1 / diag P)
    m = EASERecommender(l2=lam)
    m.fit(inter, space)
    np.testing.assert_allclose(m.b, b, atol=2e-4)
    assert np.all(np.diag(m.b) == 0.0)
    users = sorted(inter.user_id.unique())[:5]
    rows = [int(u[1:]) for u in users]
    np.testing.assert_allclose(m.score(make_histories(inter, users)), x[rows] @ b, atol=2e-3)


def test_shrunk_cosine_equals_dense_and_reduces_to_the_scorers_cosine() -> None:
    rng = np.random.default_rng(0)
    users, items, n = rng.integers(0, 30, 300), rng.integers(0, 25, 300), 25
    x = np.zeros((30, n))
    x[users, items] = 1.0
    cnt = np.sqrt(x.sum(0))
    ref = (x.T @ x) / (np.outer(cnt, cnt) + 5.0)
    np.fill_diagonal(ref, 0.0)
    got = shrunk_cosine_similarity(users, items, n, n_neighbors=n, shrink=5.0, block_items=7).toarray()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(
        shrunk_cosine_similarity(users, items, n, n_neighbors=6, shrink=0.0).toarray(),
        cooccurrence_similarity(users, items, n, n_neighbors=6).toarray(),
        rtol=1e-5,
        atol=1e-7,
    )


def _walks(n_users: int = 60, seed: int = 0) -> tuple[pd.DataFrame, ItemSpace]:
    """Users walk 3 cycles of 10 items; text vectors random."""
    rng = np.random.default_rng(seed)
    ids = np.array([f"i{j:02d}" for j in range(30)], dtype=object)
    rows = []
    for u in range(n_users):
        c, s = int(rng.integers(3)), int(rng.integers(10))
        rows += [(f"u{u:03d}", ids[10 * c + (s + t) % 10], 10 * u + t) for t in range(8)]
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "ts"]).assign(rating=np.nan, event="view")
    v = rng.normal(size=(30, 8)).astype(np.float32)
    space = ItemSpace(item_ids=ids, text_vectors=v / np.linalg.norm(v, axis=1, keepdims=True))
    return attach_item_idx(df, space), space


def test_validation_is_llmrecs_split_or_the_splits_own() -> None:
    inter, space = _walks()
    split = leave_last_out(inter)
    val = InnerValidation.build(split.train, space.n_items, 20, seed=3)
    _, va = split_last_event(split.train, 20, 3)  # what LLMRecRecommender holds out with the same settings
    assert sorted(h.user_id for h in val.histories) == sorted(va.user_id)  # (no repeats in walks)
    assert val.valid.equals(va) and val.train is not split.train
    own = InnerValidation.build(split.train, space.n_items, 20, seed=3, valid=split.valid)
    assert own.train is split.train and own.valid.equals(sample_rows(split.valid, 20, 3))
    assert [int(t[0]) for t in own.targets] == own.valid.set_index("user_id").loc[
        [h.user_id for h in own.histories], "item_idx"
    ].tolist()


def test_tuned_chooses_on_validation_refits_on_train_and_refuses_other_frames() -> None:
    inter, space = _walks()
    split = time_split(inter, test_frac=0.2)
    val = InnerValidation.build(split.train, space.n_items, None, seed=0)
    grid = [{"n_neighbors": 1}, {"n_neighbors": 9}]
    t = Tuned("itemknn", lambda **p: ItemKNNRecommender(**p), grid, val)
    t.fit(split.train, space)
    ref = {}
    for g in grid:  # reference: the same fits by hand
        m = ItemKNNRecommender(**g)
        m.fit(val.train, space)
        ref[g["n_neighbors"]] = val.ndcg(val.scores(m))
    best = max(ref, key=ref.get)
    assert t.tuning["best"] == {"n_neighbors": best} and t.val_ndcg == pytest.approx(ref[best])
    assert t.tuning["refit_on_train"] is True
    full = ItemKNNRecommender(n_neighbors=best)
    full.fit(split.train, space)  # refit on the whole train, not the inner train
    np.testing.assert_array_equal(t.model.sim.toarray(), full.sim.toarray())
    with pytest.raises(ValueError, match="train frame other than"):
        t.fit(split.train.copy(), space)


def test_combine_scores_by_hand() -> None:
    a = np.array([[1.0, 2.0, 3.0, -np.inf]], np.float32)
    b = np.array([[3.0, -np.inf, 1.0, -np.inf]], np.float32)
    za = (np.array([1, 2, 3]) - 2) / np.sqrt(2 / 3)  # population sd
    zb = (np.array([3, 1]) - 2) / 1.0
    out = combine_scores(a, b, 0.5)
    np.testing.assert_allclose(
        out[0, :3], [za[0] + 0.5 * zb[0], za[1] + 0.5 * zb[1], za[2] + 0.5 * zb[1]], rtol=1e-6
    )  # b's -inf counts as its lowest finite score
    assert np.isneginf(out[0, 3])  # -inf in both stays -inf
    np.testing.assert_array_equal(np.argsort(combine_scores(a, b, 0.0)[0, :3]), [0, 1, 2])


def test_hybrid_picks_the_better_candidate_and_never_loses_to_it_on_validation() -> None:
    inter, space = _walks()
    split = leave_last_out(inter)
    val = InnerValidation.build(split.train, space.n_items, None, seed=0, valid=split.valid)
    from llmrec.eval.baselines import make_baseline

    parts = {
        n: Tuned(n, lambda n=n, **p: make_baseline(n, **p), GRIDS[n][:2], val)
        for n in ("zeroshot_text", "ease", "itemknn")
    }
    for p in parts.values():
        p.fit(split.train, space)
    h = Hybrid("hybrid_id_itemknn", [parts["zeroshot_text"], parts["ease"]], parts["itemknn"])
    h.fit(split.train, space)
    assert h.base is parts["ease"]  # random text knows nothing; EASE learns the cycles
    assert (
        h.tuning["val_ndcg@10"] >= parts["ease"].val_ndcg - 1e-6
    )  # weight 0 is in the grid (6 decimals kept)
    hist = make_histories(split.history, ["u000"], split.seed)
    np.testing.assert_allclose(
        h.score(hist), combine_scores(parts["ease"].score(hist), parts["itemknn"].score(hist), h.weight)
    )


def test_visible_text_events_per_protocol() -> None:
    inter = pd.DataFrame(
        {
            "user_id": ["a"] * 4 + ["b"] * 4,
            "item_id": ["x", "y", "z", "w"] * 2,
            "ts": [1, 2, 3, 4, 1, 2, 6, 7],
            "rating": np.nan,
            "event": "view",
        }
    )
    texts = pd.DataFrame(
        {
            "user_id": ["a", "a", "b", "b", "c"],
            "item_id": ["x", "w", "y", "z", "z"],
            "ts": [2, 3, 5, 6, 9],
            "text": ["t1", "t2", "t3", "t4", "t5"],
        }
    )
    loo = leave_last_out(inter)  # a: valid at 3, test at 4; b: valid at 6, test at 7; c has no events
    assert visible_text_events(loo, texts).tolist() == [True, False, True, False, True]
    tim = time_split(inter, cutoff_ts=5)
    assert visible_text_events(tim, texts).tolist() == [True, True, True, False, False]
    cold = cold_item_split(inter, frac=0.25, seed=0)
    held = set(cold.cold_items)
    assert visible_text_events(cold, texts).tolist() == [i not in held for i in texts.item_id]


def test_split_item_space_reembeds_only_changed_texts(tmp_path: Path, tiny_model_dir: str) -> None:
    """Item text with a tag written after the cutoff: the split's space re-embeds that item (with the
    embeddings' own encoder) and leaves every other row as it was."""
    from llmrec.data.item_text import TextSpec
    from llmrec.embed.encoder import TextEncoder
    from llmrec.eval.text_cutoff import split_item_space

    enc = TextEncoder(tiny_model_dir, device="cpu", max_length=32)
    spec = TextSpec(label="Tags", distinct=True)
    items = pd.DataFrame(
        {
            "item_id": ["x", "y", "z"],
            "text_base": ["X film.", "Y film.", "Z film."],
            "text": ["X film. Tags: funny", "Y film. Tags: dark, slow", "Z film."],
        }
    )
    events = pd.DataFrame(
        {
            "user_id": ["a", "b", "b"],
            "item_id": ["x", "y", "y"],
            "ts": [1, 2, 9],
            "text": ["funny", "dark", "slow"],
        }
    )
    space = ItemSpace(
        item_ids=np.array(["x", "y", "z"], dtype=object),
        text_vectors=enc.encode(items["text"].tolist()),
        text_model=tiny_model_dir,
    )
    inter = pd.DataFrame(
        {
            "user_id": ["a", "a", "b", "b"],
            "item_id": ["x", "z", "y", "z"],
            "ts": [1, 3, 2, 4],
            "rating": np.nan,
            "event": "view",
        }
    )
    split = time_split(inter, cutoff_ts=3)
    new, info = split_item_space(space, items, (events, spec), split, {"max_length": 32})
    assert info["n_items_changed"] == 1 and info["n_visible"] == 2
    np.testing.assert_array_equal(new.text_vectors[[0, 2]], space.text_vectors[[0, 2]])
    np.testing.assert_allclose(new.text_vectors[1], enc.encode(["Y film. Tags: dark"])[0], atol=1e-6)
    assert not np.allclose(new.text_vectors[1], space.text_vectors[1])


def test_time_protocol_is_skipped_where_ts_is_an_order(tmp_path: Path) -> None:
    from test_evaluate import make_run

    run = make_run(tmp_path)
    meta_path = run / "data" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "ts_is_order": True}))
    res = evaluate(
        run / "data", run / "embeddings", tmp_path / "eval", protocols=("loo", "time"), models=["popularity"]
    )
    assert list(res) == ["loo"]
    ev = json.loads((tmp_path / "eval" / "meta.json").read_text())
    assert "ts_is_order" in ev["skipped_protocols"]["time"]
    assert "## Skipped protocols" in (tmp_path / "eval" / "report.md").read_text()
    with pytest.raises(ValueError, match="no protocol left"):
        evaluate(
            run / "data", run / "embeddings", tmp_path / "e2", protocols=("time",), models=["popularity"]
        )
