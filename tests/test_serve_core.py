"""Pure ranking core (llmrec.serve.recommend_core) on hand-built vectors, with a real flat ItemIndex."""

from __future__ import annotations

import numpy as np
import pytest

from llmrec.index.item_index import ItemIndex
from llmrec.protocol import Ranker, UserEncoder
from llmrec.serve.recommend_core import Catalog, RankConfig, RecommendCore
from llmrec.serve.user_view import Query, UserView

D = 8


def _unit(v) -> np.ndarray:
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v)


def _e(i: int, noise: dict[int, float] | None = None) -> np.ndarray:
    v = np.zeros(D, np.float32)
    v[i] = 1.0
    for j, x in (noise or {}).items():
        v[j] = x
    return _unit(v)


@pytest.fixture()
def core() -> RecommendCore:
    # three clusters on axes 0 (space), 1 (cooking), 2 (horror); items inside a cluster differ on axes 3..7
    vecs = {
        "space1": _e(0, {3: 0.5}),
        "space2": _e(0, {4: 0.5}),
        "space3": _e(0, {5: 0.5}),
        "cook1": _e(1, {3: 0.5}),
        "cook2": _e(1, {4: 0.5}),
        "cook3": _e(1, {5: 0.5}),  # in-cluster cos 0.8
        "cook1_dup": _e(1, {3: 0.55}),  # near-duplicate of cook1 (cosine 0.999)
        "horror1": _e(2, {3: 0.5}),
        "horror2": _e(2, {6: 0.5}),
        "popular": _e(6),
        "misc": _e(7),
    }
    ids = list(vecs)
    pop = np.array([100.0 if i == "popular" else 1.0 for i in ids])
    cat = Catalog(
        item_ids=np.array(ids, object),
        vectors=np.stack([vecs[i] for i in ids]),
        titles=np.array([f"T-{i}" for i in ids], object),
        popularity=pop,
    )
    index = ItemIndex.build(cat.vectors, ids, kind="flat", device="cpu")
    return RecommendCore(cat, index, config=RankConfig(min_candidates=20))


def _mean_user(core: RecommendCore, liked: list[str], uid: str = "u1", **kw) -> UserView:
    """Hand-computed zero-shot vector: normalised mean of the liked items' vectors."""
    cat = core.catalog
    v = _unit(np.mean([cat.vectors[cat.id_to_idx[i]] for i in liked], axis=0))
    hist = [(i, "like", None, float(t)) for t, i in enumerate(liked)]
    return UserView(user_id=uid, history=hist, seen=set(liked), vector=v, **kw)


def _rank(recs: list[dict], item: str) -> int:
    ids = [r["item_id"] for r in recs]
    return ids.index(item) if item in ids else len(ids) + 100


def test_like_raises_neighbours_and_reason_names_history(core: RecommendCore) -> None:
    before = core.recommend([_mean_user(core, ["horror1"])], k=10)[0]
    after = core.recommend([_mean_user(core, ["horror1", "space1", "space2"])], k=10)[0]
    assert _rank(after, "space3") < _rank(before, "space3")
    assert after[0]["item_id"] == "space3"  # the only unseen space item is now the top pick
    assert after[0]["reason"].startswith("because you liked 'T-space")
    assert after[0]["title"] == "T-space3"
    # scores are the cosine to the user vector (no scorer, no query): check against brute force
    u = _unit(
        np.mean([core.catalog.vectors[core.catalog.id_to_idx[i]] for i in ["horror1", "space1", "space2"]], 0)
    )
    for r in after:
        assert r["score"] == pytest.approx(
            float(core.catalog.vectors[core.catalog.id_to_idx[r["item_id"]]] @ u), abs=1e-5
        )


def test_reasons_name_only_explicitly_positive_history(core: RecommendCore) -> None:
    """Views have no direction (schema.is_positive, as in replay and the state): a reason never says "because
    you viewed"; a user whose vector comes from views only is not told the pick is merely popular."""
    cat = core.catalog
    v = _unit(np.mean([cat.vectors[cat.id_to_idx[i]] for i in ["space1", "space2"]], axis=0))
    hist = [("space1", "view", None, 0.0), ("cook1", "like", None, 1.0), ("space2", "view", None, 2.0),
            ("horror1", "rating", 3.0, 3.0)]
    u = UserView(user_id="u", history=hist, seen={h[0] for h in hist}, vector=v)
    assert u.positives() == [("cook1", "like")]
    recs = core.recommend([u], k=5)[0]
    assert recs[0]["item_id"] == "space3"
    assert recs[0]["reason"] == "because you liked 'T-cook1'"  # the only positive item, not a viewed one
    only_views = UserView(user_id="w", history=[hist[0], hist[2]], seen={"space1", "space2"}, vector=v)
    assert only_views.positives() == []
    r = core.recommend([only_views], k=3)[0]
    assert r[0]["item_id"] == "space3" and r[0]["reason"] == "based on your recent activity"


def test_dislike_sinks_item_and_near_duplicate(core: RecommendCore) -> None:
    base = _mean_user(core, ["cook2"])
    before = core.recommend([base], k=10)[0]
    assert _rank(before, "cook1") < 4 and _rank(before, "cook1_dup") < 4
    disliked = _mean_user(core, ["cook2"], negatives={"cook1": 1.0})
    after = core.recommend([disliked], k=10)[0]
    ids = [r["item_id"] for r in after]
    # both the disliked item and its near-duplicate fall below every non-penalised candidate
    assert ids.index("cook1") >= len(ids) - 2 and ids.index("cook1_dup") >= len(ids) - 2
    assert ids[0] == "cook3"  # the unrelated cooking item is not a near-duplicate (cos < 0.9) and stays up
    assert "disliked" in after[ids.index("cook1_dup")]["reason"]


def test_query_steers_and_is_the_reason(core: RecommendCore) -> None:
    u = _mean_user(core, ["cook1"])
    plain = core.recommend([u], k=5)[0]
    assert plain[0]["item_id"].startswith("cook")
    steered = core.recommend([u], k=5, queries=[Query("scary movies", _e(2))])[0]
    assert steered[0]["item_id"].startswith("horror")
    assert steered[0]["reason"] == "matches your query 'scary movies'"


def test_exclude_seen(core: RecommendCore) -> None:
    u = _mean_user(core, ["space1", "space2"])
    excl = [r["item_id"] for r in core.recommend([u], k=11, exclude_seen=True)[0]]
    incl = [r["item_id"] for r in core.recommend([u], k=11, exclude_seen=False)[0]]
    assert not {"space1", "space2"} & set(excl)
    assert {"space1", "space2"} <= set(incl[:3])
    assert len(excl) == core.catalog.n_items - 2 and len(incl) == core.catalog.n_items


def test_new_user_gets_popularity_then_query(core: RecommendCore) -> None:
    recs = core.recommend([UserView(user_id="new")], k=3)[0]
    assert recs[0]["item_id"] == "popular" and recs[0]["reason"] == "popular with other users"
    q = core.recommend([UserView(user_id="new")], k=3, queries=[Query("cooking", _e(1))])[0]
    assert q[0]["item_id"].startswith("cook") and q[0]["reason"].startswith("matches your query")


def test_batch_equals_single(core: RecommendCore) -> None:
    users = [_mean_user(core, ["space1"], "a"), UserView(user_id="b"), _mean_user(core, ["cook1"], "c")]
    qs = [None, Query("horror", _e(2)), Query("space", _e(0))]
    batch = core.recommend(users, k=[3, 4, 5], queries=qs)
    for u, q, k, got in zip(users, qs, [3, 4, 5], batch, strict=True):
        assert got == core.recommend([u], k=k, queries=[q])[0]


def test_state_summary_forms_are_accepted(core: RecommendCore) -> None:
    summary = {
        "user_id": "s",
        "version": 3,
        "history": [{"item_id": "space1", "event": "like", "value": None, "ts": 1.0}],
        "negatives": {"cook1": 1.0},
        "seen": ["space1"],
        "vector": _e(0).tolist(),
    }
    v = UserView.from_state(summary)
    assert v.version == 3 and v.seen == {"space1"} and v.negatives == {"cook1": 1.0}
    v2 = UserView.from_state({**summary, "history": [["space1", "like", None, 1.0]]})
    assert v2.history == v.history
    # the typed StateSummary the store returns, and the UserState it summarises, give the same view
    from llmrec.state.user_state import Event, UserState, apply_event
    from llmrec.state.user_state import summary as summarise

    st = UserState("s")
    for e in [Event(user_id="s", item_id="space1", event="like", ts=1.0),
              Event(user_id="s", item_id="cook1", event="dislike", ts=2.0),
              Event(user_id="s", event="like", text="more space", text_vec=_e(0).tolist(), ts=3.0)]:
        st = apply_event(st, e)
    st.vector = _e(0)
    typed = UserView.from_state(summarise(st, vector=st.vector, shard=0))
    direct = UserView.from_state(st)
    assert (typed.user_id, typed.history, typed.seen, typed.negatives, typed.version) == (
        "s", [("space1", "like", None, 1.0), ("cook1", "dislike", None, 2.0)], {"space1", "cook1"},
        {"cook1": 1.0}, 3)
    assert (direct.history, direct.seen, direct.negatives, direct.version) == (
        typed.history, typed.seen, typed.negatives, typed.version)
    np.testing.assert_array_equal(typed.vector, direct.vector)
    assert [(t, p) for t, p, _ in typed.text_feedback] == [("more space", 1.0)]
    np.testing.assert_array_equal(typed.text_feedback[0][2], direct.text_feedback[0][2])
    assert core.recommend([typed], k=3) == core.recommend([direct], k=3)


def test_bad_inputs_raise_clear_errors(core: RecommendCore) -> None:
    with pytest.raises(ValueError, match="user vector has shape"):
        core.recommend([UserView(user_id="x", vector=np.ones(3, np.float32))], k=3)
    with pytest.raises(ValueError, match="query vector must be"):
        core.recommend([UserView(user_id="x")], k=3, queries=[Query("q", np.ones(3, np.float32))])
    with pytest.raises(ValueError, match="query_weight"):
        RankConfig(query_weight=2.0)


def test_default_scorer_only_when_evaluation_measured_it_better(tmp_path):
    import json

    from llmrec.artifacts import write_meta
    from llmrec.serve.recommend_core import default_scorer_is_better
    from llmrec.serve.run_artifacts import resolve_artifacts

    run = tmp_path / "run"
    assert default_scorer_is_better(run) == (False, "no trained scorer in the run")
    write_meta(run / "scorer", "train")
    assert default_scorer_is_better(run)[0] is True  # nothing measured against: trust the trained model

    def metrics(ours: float, text: float) -> None:
        (run / "eval").mkdir(exist_ok=True)
        models = {"llmrec": {"ndcg@10": ours}, "zeroshot_text": {"ndcg@10": text}}
        (run / "eval" / "metrics.json").write_text(json.dumps({"loo": {"models": models}}))

    metrics(0.05, 0.02)
    assert default_scorer_is_better(run)[0] is True
    assert resolve_artifacts(str(run), {}).scorer_dir == str(run / "scorer")
    metrics(0.009, 0.0095)
    use, why = default_scorer_is_better(run)
    assert use is False and "0.0090 <= zero-shot text 0.0095" in why
    assert resolve_artifacts(str(run), {}).scorer_dir is None
    # an explicit user_config choice wins over the measurement
    assert (
        resolve_artifacts(str(run), {"scorer_dir": str(run / "scorer")}).scorer_dir == str(run / "scorer")
    )


def test_serve_or_not_compares_with_the_served_fallback(tmp_path):
    """The rule reads the `served_text` model (the fallback as served); an evaluation without it is read as
    before (zeroshot_text), and the reason says that the stand-in was used."""
    import json

    from llmrec.artifacts import write_meta
    from llmrec.serve.recommend_core import default_scorer_is_better

    run = tmp_path / "run"
    write_meta(run / "scorer", "train")
    (run / "eval").mkdir()
    models = {
        "llmrec": {"ndcg@10": 0.05}, "zeroshot_text": {"ndcg@10": 0.02}, "served_text": {"ndcg@10": 0.06}
    }
    (run / "eval" / "metrics.json").write_text(json.dumps({"loo": {"models": models}}))
    use, why = default_scorer_is_better(run)
    assert use is False and why.startswith("loo ndcg@10 0.0500 <= served text fallback 0.0600")
    models["served_text"]["ndcg@10"] = 0.01
    (run / "eval" / "metrics.json").write_text(json.dumps({"loo": {"models": models}}))
    assert default_scorer_is_better(run) == (True, "loo ndcg@10 0.0500 > served text fallback 0.0100")
    del models["served_text"]
    (run / "eval" / "metrics.json").write_text(json.dumps({"loo": {"models": models}}))
    use, why = default_scorer_is_better(run)
    assert use is True and "> zero-shot text 0.0200" in why and "no served_text model" in why


def test_served_text_model_ranks_as_serving_does(core: RecommendCore) -> None:
    """The `served_text` evaluation model and the serving fallback (the state's MeanVectorizer vector, then
    RecommendCore without a scorer, seen items excluded) give the same top-k for users with likes, views,
    mid ratings, dislikes (push-down) and no positive signal (popularity)."""
    import pandas as pd

    from llmrec.eval.served_text import HISTORY_LEN, ServedTextRecommender
    from llmrec.protocol import History, ItemSpace
    from llmrec.schema import ITEM_IDX
    from llmrec.state.store import EmbeddingsMeanVectorizer
    from llmrec.state.user_state import MeanVectorizer, state_from_history, summary

    cat = core.catalog
    ids = [str(i) for i in cat.item_ids]
    space = ItemSpace(item_ids=np.array(ids, object), text_vectors=cat.vectors)
    # popularity from the training counts, as serving's Catalog takes it from the run's interactions
    counts = {i: (100 if i == "popular" else 1) for i in ids}
    train = pd.DataFrame({ITEM_IDX: np.repeat(np.arange(len(ids)), [counts[i] for i in ids])})
    model = ServedTextRecommender()
    model.fit(train, space)
    f = EmbeddingsMeanVectorizer("")
    vectorizer = MeanVectorizer(ids, cat.vectors, half_life=f.half_life, negative_weight=f.negative_weight,
                                text_weight=f.text_weight)
    users = {
        "likes": [("space1", "like", None), ("space2", "view", None), ("cook2", "rating", 3.0)],
        "dislike": [("cook2", "like", None), ("cook1", "dislike", None), ("space1", "view", None)],
        "views": [("horror1", "view", None), ("horror2", "click", None)],
        "cold": [("misc", "skip", None)],
    }
    k = 4
    for uid, evs in users.items():
        hist = [(i, e, v, float(t)) for t, (i, e, v) in enumerate(evs)]
        st = state_from_history(uid, hist, history_len=HISTORY_LEN)
        vec = vectorizer(st)
        view = UserView.from_state(summary(st, vector=vec))
        recs = core.recommend([view], k=k)[0]
        served = [r["item_id"] for r in recs]
        h = History(uid, np.array([cat.id_to_idx[i] for i, *_ in hist]), np.arange(len(hist)),
                    np.array([e for _, e, *_ in hist], object),
                    np.array([np.nan if v is None else v for _, _, v, _ in hist]))
        s = model.score([h])[0]
        s[h.item_idx] = -np.inf  # evaluation excludes the history, serving its seen items
        # the same items with the same scores, best first (equal scores may come in either order)
        assert [s[cat.id_to_idx[i]] for i in served] == pytest.approx(
            [r["score"] for r in recs], abs=1e-5
        ), uid
        assert np.sort(s)[::-1][:k] == pytest.approx([r["score"] for r in recs], abs=1e-5), uid
    assert served[0] == "popular"  # the cold user (a skip only) got the popularity prior


def test_scorer_mode_ranks_by_the_scorer_with_its_co_occurrence_term(core: RecommendCore) -> None:
    """With a deployed Scorer (u.v + w * co-occurrence), the served order of the candidates is the Scorer's
    own ranking-score order for the user's positive history (a disliked item adds no co-occurrence); the
    co-occurrence pair (space1 -> misc) lifts 'misc' above where u.v alone puts it."""
    import scipy.sparse as sp
    import torch

    from llmrec.protocol import History
    from llmrec.scorer.inference import Scorer
    from llmrec.scorer.model import ScorerConfig, ScorerModel

    cat = core.catalog
    n = len(cat.item_ids)
    # cold_impute_k=0: in this catalog almost no item has co-occurrence data, so borrowing text neighbours'
    # co-occurrences (tested in test_cooc) would blur the term this test isolates
    cfg = ScorerConfig(text_dim=D, n_items=n, n_id_slots=1, dim=D, max_len=8, rerank=False, cooc_weight=2.0,
                       cold_impute_k=0)
    model = ScorerModel(cfg, torch.from_numpy(cat.vectors), torch.zeros(n, dtype=torch.long))
    model.warm_start()
    i = cat.id_to_idx
    sim = sp.csr_matrix(([1.0, 1.0], ([i["space1"], i["cook1"]], [i["misc"], i["popular"]])), shape=(n, n))
    scorer = Scorer(model, np.asarray(cat.item_ids).astype(str), cooc=sim)
    assert isinstance(scorer, Ranker)  # what RecommendCore is typed against
    served = RecommendCore(cat, core.index, scorer=scorer, config=RankConfig(min_candidates=20))
    hist = [("space1", "like", None, 0.0), ("space2", "click", None, 1.0), ("cook1", "dislike", None, 2.0)]
    user = UserView(user_id="u", history=hist, seen={"space1", "space2", "cook1"}, negatives={"cook1": 1.0})
    recs = served.recommend([user], k=n)[0]
    # cook1_dup: pushed down (negative)
    got = [r["item_id"] for r in recs if r["item_id"] not in ("cook1_dup",)]
    h = History("u", np.array([i["space1"], i["space2"], i["cook1"]]), np.arange(3),
                np.array(["like", "click", "dislike"]), np.full(3, np.nan))
    cand = np.array([i[x] for x in got])
    u = scorer.user_vectors([h])
    ref = scorer.score(u, cand[None], history_items=[np.array([i["space1"], i["space2"]])])[0]
    assert np.all(np.diff(ref) <= 1e-6)  # served order == the scorer's order (ties in either order)
    assert ref[0] > ref[1] + 1.0  # misc, lifted by its co-occurrence with space1, is first
    plain = scorer.score(u, cand[None])[0]  # without co-occurrence
    assert got.index("misc") < list(cand[np.argsort(-plain, kind="stable")]).index(i["misc"])


def test_the_served_models_meet_the_protocols_serving_is_typed_against() -> None:
    from llmrec.state.user_state import MeanVectorizer

    vec = MeanVectorizer(["a", "b"], np.eye(2, dtype=np.float32))
    assert isinstance(vec, UserEncoder) and not isinstance(vec, Ranker)
    user = UserView(user_id="u", history=[("b", "like", None, 0.0)])
    np.testing.assert_allclose(vec(user), [0.0, 1.0])  # a UserView is a user the encoder reads
    assert not isinstance(object(), UserEncoder)
