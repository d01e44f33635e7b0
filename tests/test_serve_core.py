"""Pure ranking core (llmrec.serve.recommend_core) on hand-built vectors, with a real flat ItemIndex."""

from __future__ import annotations

import numpy as np
import pytest

from llmrec.index.item_index import ItemIndex
from llmrec.protocol import Ranker, UserEncoder
from llmrec.serve.recommend_core import Catalog, Query, RankConfig, RecommendCore, UserView

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
    from llmrec.serve.deployments import resolve_artifacts
    from llmrec.serve.recommend_core import default_scorer_is_better

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
    assert resolve_artifacts(str(run), {})["scorer_dir"] == str(run / "scorer")
    metrics(0.009, 0.0095)
    use, why = default_scorer_is_better(run)
    assert use is False and "0.0090 <= zero-shot text 0.0095" in why
    assert resolve_artifacts(str(run), {})["scorer_dir"] is None
    # an explicit user_config choice wins over the measurement
    assert resolve_artifacts(str(run), {"scorer_dir": str(run / "scorer")})["scorer_dir"] == str(run / "scorer")


def test_scorer_mode_ranks_by_the_scorer_with_its_co_occurrence_term(core: RecommendCore) -> None:
    """With a deployed Scorer (u.v + w * co-occurrence), the served order of the candidates is the Scorer's own
    ranking-score order for the user's positive history (a disliked item adds no co-occurrence); the
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
    got = [r["item_id"] for r in recs if r["item_id"] not in ("cook1_dup",)]  # cook1_dup: pushed down (negative)
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
