"""The cold-item bonus and slots: what they do to a ranking, and how validation chooses them
(tune_cold_bonus)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from llmrec.protocol import ItemSpace
from llmrec.schema import EVENT, ITEM_ID, RATING, TS, USER_ID
from llmrec.scorer.data import build_validation
from llmrec.scorer.finalize import tune_cold_bonus
from llmrec.scorer.model import ScorerConfig, ScorerModel, cold_slot_scores, two_stage_rank


def _twins(n_pairs: int = 30, n_users: int = 400, seed: int = 0):
    """Items come in text twins (2p, 2p+1: nearly the same text); a user likes one twin, then the other, so
    the text knows every next item and behaviour adds nothing."""
    rng = np.random.default_rng(seed)
    n = 2 * n_pairs
    base = rng.normal(size=(n_pairs, 16))
    text = np.repeat(base, 2, axis=0) + 0.05 * rng.normal(size=(n, 16))
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    rows = []
    for u in range(n_users):
        p = rng.integers(n_pairs)
        a, b = (2 * p, 2 * p + 1) if rng.random() < 0.5 else (2 * p + 1, 2 * p)
        rows += [(f"u{u}", f"i{a}", 1, np.nan, "like"), (f"u{u}", f"i{b}", 2, np.nan, "like")]
    df = pd.DataFrame(rows, columns=[USER_ID, ITEM_ID, TS, RATING, EVENT])
    return ItemSpace(np.array([f"i{i}" for i in range(n)]), text.astype(np.float32)), df


def _model(items: ItemSpace, id_strength: float, **cfg) -> ScorerModel:
    """A warm-started scorer in which every item with an ID carries the same ID vector: behaviour favours any
    warm item by about id_strength^2 over a cold one, whatever the user wants (a popularity prior)."""
    n = items.n_items
    torch.manual_seed(0)
    c = ScorerConfig(**{"text_dim": 16, "n_items": n, "n_id_slots": n + 1, "dim": 8, "max_len": 4,
                        "rerank": False, "cold_impute_k": 0, **cfg})
    m = ScorerModel(c, torch.from_numpy(items.text_vectors), torch.arange(1, n + 1))
    m.warm_start()
    with torch.no_grad():
        a = torch.zeros(8)
        a[0] = id_strength
        m.id_emb.weight[1:] = a
    return m.eval()


def test_the_bonus_lifts_exactly_the_items_without_an_id():
    items, _ = _twins(n_pairs=5)
    m0 = _model(items, 1.0)
    m1 = _model(items, 1.0, cold_bonus=0.3)
    u = torch.randn(2, m0.all_item_reps().shape[1])
    with m0.items_made_cold(np.array([3, 7])), m1.items_made_cold(np.array([3, 7])):  # two cold items
        r0, c0, h0 = two_stage_rank(m0, u, m0.all_item_reps(), None, m0.cfg.n_items)
        r1, c1, h1 = two_stage_rank(m1, u, m1.all_item_reps(), None, m1.cfg.n_items)
    cold = torch.zeros(m0.cfg.n_items)
    cold[[3, 7]] = 0.3
    torch.testing.assert_close(r1, r0 + cold)
    s0 = torch.zeros_like(r0).scatter(1, c0, h0)
    s1 = torch.zeros_like(r1).scatter(1, c1, h1)
    torch.testing.assert_close(s1, s0 + cold)  # rerank off: ranking scores are u.v, so the same bonus


def test_validation_chooses_the_bonus_that_undoes_the_warm_items_advantage():
    items, df = _twins()
    train = df[df[USER_ID].isin([f"u{u}" for u in range(200)])]
    rest = df[~df[USER_ID].isin(train[USER_ID])]
    val = build_validation(pd.concat([train, rest[rest[TS] == 1]]), rest[rest[TS] == 2], items, max_len=4)
    model = _model(items, 1.0)
    slots = model.id_slots.clone()
    grid = (0.0, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2)
    bonus, info = tune_cold_bonus(model, val, None, n_candidates=items.n_items, grid=grid, frac=0.2,
                                  min_targets=20, every_grid=(0,), keep_grid=(0.0,))  # the bonus alone
    assert info["measured"] and info["n_pseudo_cold_items"] == 12 and info["n_cold_targets"] >= 20
    ndcg, cold_ndcg = info["val_ndcg"], info["val_ndcg_cold_targets"]
    # without a bonus the made-cold twins fall below every warm item; the chosen bonus brings them back
    assert cold_ndcg[0] < 0.5 < cold_ndcg[grid.index(bonus)]
    assert ndcg[grid.index(bonus)] > ndcg[0]
    # a bonus far above the warm advantage floods every list with cold items: warm-target users pay, and the
    # overall NDCG (not the cold targets' alone, which only grows) refuses it
    assert bonus < 3.2 and ndcg[-1] < max(ndcg)
    assert torch.equal(model.id_slots, slots) and model.cfg.cold_bonus == 0.0  # the model is left as it was


def test_imputed_co_occurrence_scales_linearly_and_zero_turns_it_off():
    """ScorerModel.cooc_impute: the text neighbours' weights times cfg.cooc_impute, so an item without
    co-occurrence data scores that multiple of its unscaled imputed score; 0 -> no imputation at all."""
    import dataclasses

    import scipy.sparse as sp

    from llmrec.cooc import history_scores

    items, df = _twins(n_pairs=6)
    model = _model(items, 1.0, cold_impute_k=3)
    n = items.n_items
    sim = sp.random(n, n, density=0.3, random_state=0, dtype=np.float32).tolil()
    sim[5, :] = 0
    sim[:, 5] = 0  # item 5 has no co-occurrence data
    sim[7, 4] = 0.5  # its twin, item 4, co-occurs with history item 7
    sim = sim.tocsr()
    hists, cand = [np.array([4, 7]), np.array([1])], np.tile(np.arange(n), (2, 1))
    full = history_scores(sim, hists, cand, impute=model.cooc_impute(sim))
    model.cfg = dataclasses.replace(model.cfg, cooc_impute=0.5)
    half = history_scores(sim, hists, cand, impute=model.cooc_impute(sim))
    np.testing.assert_allclose(half[:, 5], 0.5 * full[:, 5], rtol=1e-6)
    assert full[0, 5] > 0  # borrowed from its twin
    np.testing.assert_allclose(np.delete(half, 5, 1), np.delete(full, 5, 1))  # the others are untouched
    model.cfg = dataclasses.replace(model.cfg, cooc_impute=0.0)
    assert model.cooc_impute(sim) is None


def test_validation_turns_the_imputation_on_where_made_cold_targets_need_it():
    """Chains of text twins: a user likes a twin of pair p, then one of pair p + 1, whose text is unrelated;
    behaviour alone knows the next pair. A made-cold target has no co-occurrence data, but its twin does (with
    the history item): borrowing its score puts the target among the few items with a score, so the
    imputation is chosen on (not 0), and the model is left as it was. (The bonus is held at 0 here: it could
    lift the made-cold targets too.)"""
    import dataclasses

    from llmrec.scorer.finalize import cooc_matrix

    rng = np.random.default_rng(1)
    items, _ = _twins()
    n_pairs = items.n_items // 2
    rows = []
    for u in range(600):
        p = int(rng.integers(n_pairs))
        a, b = 2 * p + int(rng.integers(2)), 2 * ((p + 1) % n_pairs) + int(rng.integers(2))
        rows += [(f"u{u}", f"i{a}", 1, np.nan, "like"), (f"u{u}", f"i{b}", 2, np.nan, "like")]
    df = pd.DataFrame(rows, columns=[USER_ID, ITEM_ID, TS, RATING, EVENT])
    train = df[df[USER_ID].isin([f"u{u}" for u in range(400)])]
    rest = df[~df[USER_ID].isin(train[USER_ID])]
    val = build_validation(pd.concat([train, rest[rest[TS] == 1]]), rest[rest[TS] == 2], items, max_len=4)
    model = _model(items, 0.5, cold_impute_k=3)  # a warm advantage (0.25) below the co-occurrence term's
    model.cfg = dataclasses.replace(model.cfg, cooc_weight=5.0, cooc_impute=0.0)
    sim = cooc_matrix(train, items, n_neighbors=10)
    bonus, info = tune_cold_bonus(model, val, sim, n_candidates=items.n_items, grid=(0.0,), frac=0.2,
                                  min_targets=20, impute_grid=(0.0, 1.0))
    assert info["measured"] and info["impute_grid"] == [0.0, 1.0]
    by, cold = info["val_ndcg_by_impute"], info["val_ndcg_cold_targets"]
    assert info["cooc_impute"] == 1.0 and by["1"][0] > by["0"][0], by
    # the made-cold targets at the chosen imputation rank among the 4 items of the pairs next to the history's
    # (co-occurrence is symmetric); without it, among the 50 items with no score
    _, info_off = tune_cold_bonus(model, val, sim, n_candidates=items.n_items, grid=(0.0,), frac=0.2,
                                  min_targets=20, impute_grid=(0.0,))
    assert cold[0] > 0.25 and info_off["val_ndcg_cold_targets"][0] < 0.1, (cold, info_off)
    assert model.cfg.cooc_impute == 0.0 and model.cfg.cold_bonus == 0.0
    # without a co-occurrence term there is nothing to impute: the grid is not tried
    _, info0 = tune_cold_bonus(model, val, None, n_candidates=items.n_items, frac=0.2, min_targets=20)
    assert info0["impute_grid"] == [0.0] and "1" not in info0["val_ndcg_by_impute"]
    # the grid's one two-stage pass gives, per imputation and slot setting, what the served ranking of a model
    # with those settings gives (served_val_ndcg, its own pass)
    import scipy.sparse as sp

    from llmrec.scorer.finalize import served_val_ndcg, served_val_ndcg_grid

    cold = np.arange(0, items.n_items, 5)
    keep = np.ones(items.n_items, dtype=np.float32)
    keep[cold] = 0
    sim_c = (sp.diags(keep) @ sim @ sp.diags(keep)).tocsr()  # made-cold items lose their co-occurrence data
    with model.items_made_cold(cold):
        grid_f, grid_e, saved = (0.0, 1.0), ((0, 0.0), (3, 0.0), (0, 1.0), (5, 2.0)), model.cfg
        imputes = []
        for f in grid_f:
            model.cfg = dataclasses.replace(saved, cooc_impute=f)
            imputes.append(model.cooc_impute(sim_c))
        model.cfg = saved
        got = served_val_ndcg_grid(model, val, sim_c, imputes, grid_e, n_candidates=items.n_items)
        for fi, f in enumerate(grid_f):
            for ei, (e, keep) in enumerate(grid_e):
                model.cfg = dataclasses.replace(saved, cooc_impute=f, cold_every=e, cold_keep=keep)
                want = served_val_ndcg(model, val, sim_c, model.cooc_impute(sim_c), items.n_items)
                np.testing.assert_array_equal(got[fi, ei], want)
        model.cfg = saved
    # the imputation and the slots change the ranking here, so the check has teeth
    assert got[0, 0].mean() != got[1, 0].mean() and got[1, 0].mean() != got[1, 1].mean()
    assert got[1, 0].mean() != got[1, 2].mean()


def _greedy_slots(score: np.ndarray, cold: np.ndarray, every: int) -> list[int]:
    """Reference for one row: fill positions 1, 2, ... from the plain order, taking the best remaining cold
    candidate whenever fewer than position // every cold items are placed, else whichever of the best
    remaining cold and other candidate comes first in the plain order."""
    order = list(np.argsort(-score, kind="stable"))
    cold = cold & np.isfinite(score)
    c_q, w_q = [i for i in order if cold[i]], [i for i in order if not cold[i]]
    out: list[int] = []
    for p in range(1, len(order) + 1):
        n_cold = sum(bool(cold[i]) for i in out)
        if c_q and (n_cold < p // every or not w_q or order.index(c_q[0]) < order.index(w_q[0])):
            out.append(c_q.pop(0))
        else:
            out.append(w_q.pop(0))
    return out


def test_cold_slots_give_the_greedy_slotted_order_and_move_only_the_promoted_items():
    rng = np.random.default_rng(0)
    for every in (2, 3, 5, 10):
        score = rng.normal(size=(40, 30)).astype(np.float32)
        score[rng.random(score.shape) < 0.1] = -np.inf  # not candidates: never moved
        cold = rng.random(score.shape) < rng.uniform(0.05, 0.5, size=(40, 1))
        out = cold_slot_scores(score, cold, every)
        for b in range(len(score)):
            got = list(np.argsort(-out[b], kind="stable"))
            assert got == _greedy_slots(score[b], cold[b], every), (every, b)
            moved = out[b] != score[b]
            assert np.all(cold[b][moved] & np.isfinite(score[b][moved]))
            assert np.all(out[b][moved] > score[b][moved])  # moved up, never down
            top = got[: 3 * every]  # at least one cold item in every `every` positions while there are any
            n_cold = int((cold[b] & np.isfinite(score[b])).sum())
            for p in range(every, len(top) + 1, every):
                assert sum(bool(cold[b][i] and np.isfinite(score[b][i])) for i in top[:p]) >= min(p // every,
                                                                                                  n_cold)
    np.testing.assert_array_equal(cold_slot_scores(score, cold, 0), score)


def _greedy_placed(score: np.ndarray, cold: np.ndarray, every: int, keep: float,
                   neural: np.ndarray) -> list[int]:
    """Reference for one row: fill positions 1, 2, ... taking whichever of the best remaining cold and other
    candidate comes first in the plain order, except that a cold candidate is taken whenever putting another
    one here would leave some remaining cold candidate (they keep their order) no way to meet its deadline
    (j * every for the j-th cold one; ceil(keep * its position in the neural order))."""
    order = list(np.argsort(-score, kind="stable"))
    cold = cold & np.isfinite(score)
    nat = {int(i): r + 1 for r, i in enumerate(np.argsort(-neural, kind="stable"))}
    c_q, w_q = [i for i in order if cold[i]], [i for i in order if not cold[i]]
    deadline = {}
    for j, i in enumerate(c_q, start=1):
        d = len(order)
        if every:
            d = min(d, j * every)
        if keep:
            d = min(d, int(np.ceil(keep * nat[int(i)])))
        deadline[i] = d
    out: list[int] = []
    for p in range(1, len(order) + 1):
        if c_q and w_q and order.index(w_q[0]) < order.index(c_q[0]):
            if any(p + 1 + k > deadline[i] for k, i in enumerate(c_q)):
                out.append(c_q.pop(0))
            else:
                out.append(w_q.pop(0))
        else:
            out.append(c_q.pop(0) if c_q else w_q.pop(0))
    return out


def test_cold_items_keep_their_neural_place_as_the_greedy_reference_places_them():
    """cold_keep: a cold candidate ranks no lower than keep x its place in the ranking without the
    co-occurrence term, cold candidates keep their order (an earlier one makes room for a later one's
    deadline), the others keep theirs, and only moved cold items change score, upwards; with slots too."""
    rng = np.random.default_rng(1)
    n_moved = 0
    for every, keep in ((0, 1.0), (0, 1.5), (0, 2.0), (0, 3.0), (5, 1.0), (3, 2.0), (10, 1.0)):
        score = rng.normal(size=(40, 25)).astype(np.float32)
        score[rng.random(score.shape) < 0.1] = -np.inf
        cold = rng.random(score.shape) < rng.uniform(0.05, 0.6, size=(40, 1))
        # the neural order agrees with the plain one in part (the co-occurrence term reorders the rest)
        neural = (score + rng.normal(scale=1.0, size=score.shape)).astype(np.float32)
        neural[~np.isfinite(score)] = -np.inf
        out = cold_slot_scores(score, cold, every, keep=keep, neural=neural)
        for b in range(len(score)):
            got = list(np.argsort(-out[b], kind="stable"))
            assert got == _greedy_placed(score[b], cold[b], every, keep, neural[b]), (every, keep, b)
            moved = out[b] != score[b]
            n_moved += int(moved.sum())
            assert np.all(cold[b][moved] & np.isfinite(score[b][moved]))
            assert np.all(out[b][moved] > score[b][moved])  # moved up, never down
            # every cold candidate meets its deadline, or sits right below the cold ones before it
            nat = {int(i): r + 1 for r, i in enumerate(np.argsort(-neural[b], kind="stable"))}
            cold_in_order = [i for i in got if cold[b][i] and np.isfinite(score[b][i])]
            for j, i in enumerate(cold_in_order, start=1):
                d = min(j * every if every else len(got), int(np.ceil(keep * nat[int(i)])))
                assert got.index(i) + 1 <= max(j, d), (every, keep, b, i)
    assert n_moved > 100  # the check has teeth
    # without the co-occurrence term the neural order is the plain one: nothing moves
    np.testing.assert_array_equal(cold_slot_scores(score, cold, 0, keep=1.0, neural=score), score)
    with pytest.raises(ValueError, match="needs the neural scores"):
        cold_slot_scores(score, cold, 0, keep=1.0)
    with pytest.raises(ValueError, match="keep must be 0 or >= 1, got 0.5"):
        cold_slot_scores(score, cold, 0, keep=0.5, neural=score)


def test_served_ranking_applies_the_slots_and_its_reason_parts_still_add_up():
    """Scorer.rank (what serving, batch recommendations and evaluation all rank with) puts a cold item in
    every cold_every positions; the lift counts as content, and full_scores orders the catalog the same
    way."""
    import dataclasses

    from llmrec.protocol import History
    from llmrec.scorer.inference import Scorer

    items, _ = _twins(n_pairs=10)
    warm_first = _model(items, 3.0)  # every warm item far above every cold one
    cold_items = np.array([1, 5, 9, 13])
    slots = warm_first.id_slots.clone()
    slots[torch.as_tensor(cold_items)] = 0
    m = ScorerModel(dataclasses.replace(warm_first.cfg, cold_every=3), warm_first.text_vectors, slots)
    m.load_state_dict({k: v for k, v in warm_first.state_dict().items() if k != "id_slots"}, strict=False)
    s = Scorer(m.eval(), items.item_ids)
    plain = Scorer(ScorerModel(warm_first.cfg, warm_first.text_vectors, slots).eval(), items.item_ids)
    plain.model.load_state_dict(m.state_dict())
    hists = [History(f"u{b}", np.array([2 * b]), np.array([1]), np.array(["like"]), np.array([np.nan]))
             for b in range(4)]
    idx0, _ = plain.recommend(hists, k=9)
    idx, _ = s.recommend(hists, k=9)
    assert not np.isin(idx0[:, :4], cold_items).any()  # without slots the cold items trail the warm ones
    for b in range(len(hists)):
        assert [bool(i in cold_items) for i in idx[b]] == [False, False, True] * 3, idx[b]
        assert list(idx[b][[0, 1, 3, 4, 6, 7]]) == list(idx0[b][:6])  # the others keep their order
    r = s.rank(hists)
    ok = np.isfinite(r.score)
    np.testing.assert_allclose(sum(r.parts.values())[ok], r.score[ok], rtol=1e-5, atol=1e-5)
    full = s.full_scores(hists)
    np.testing.assert_array_equal(np.argsort(-full, axis=1, kind="stable")[:, :9], idx)


def test_served_ranking_keeps_cold_items_at_their_neural_place_above_the_co_occurrence_winners():
    """Scorer.rank with cold_keep: the co-occurrence term lifts the warm items it knows above every cold item;
    with cold_keep each cold item ranks no lower than cold_keep x its place in the ranking without the term,
    the warm items keep the order the term gave them, and the reason parts still add up."""
    import dataclasses

    import scipy.sparse as sp

    from llmrec.protocol import History
    from llmrec.scorer.inference import Scorer

    items, _ = _twins(n_pairs=15)
    n = items.n_items
    base = _model(items, 0.0)  # no ID prior: the neural order is the text's
    cold_items = np.arange(1, n, 4)
    slots = base.id_slots.clone()
    slots[torch.as_tensor(cold_items)] = 0
    rng = np.random.default_rng(3)
    sim = sp.random(n, n, density=0.3, random_state=4, format="csr", dtype=np.float32)
    keep_cold = np.ones(n, dtype=np.float32)
    keep_cold[cold_items] = 0
    sim = (sp.diags(keep_cold) @ sim @ sp.diags(keep_cold)).tocsr()  # cold items have no co-occurrences

    def scorer(keep: float) -> Scorer:
        cfg = dataclasses.replace(base.cfg, cooc_weight=5.0, cooc_impute=0.0, cold_keep=keep)
        m = ScorerModel(cfg, base.text_vectors, slots)
        m.load_state_dict({k: v for k, v in base.state_dict().items() if k != "id_slots"}, strict=False)
        return Scorer(m.eval(), items.item_ids, cooc=sim)

    hists = [History(f"u{b}", rng.choice(n, size=2, replace=False), np.array([1, 2]),
                     np.array(["like", "like"]), np.array([np.nan, np.nan])) for b in range(12)]
    plain, kept = scorer(0.0), scorer(1.5)
    neural = plain.rank(hists, n_candidates=n, use_cooc=False)
    idx0, _ = plain.recommend(hists, k=n, n_candidates=n)
    idx, _ = kept.recommend(hists, k=n, n_candidates=n)
    pushed_down = 0
    for b in range(len(hists)):
        ok = np.isfinite(neural.score[b])
        order = neural.cand[b][ok][np.argsort(-neural.score[b][ok], kind="stable")]
        place = {int(i): r + 1 for r, i in enumerate(order)}
        got = [int(i) for i in idx[b] if i >= 0]
        was = [int(i) for i in idx0[b] if i >= 0]
        pushed_down += sum(was.index(i) + 1 > place[i] for i in was if i in cold_items)
        cold_in_order = [i for i in got if i in cold_items]
        for j, i in enumerate(cold_in_order, start=1):
            assert got.index(i) + 1 <= max(j, int(np.ceil(1.5 * place[i]))), (b, i)
        assert [i for i in got if i not in cold_items] == [i for i in was if i not in cold_items]
        assert cold_in_order == [i for i in was if i in cold_items]
    assert pushed_down > 20  # without cold_keep the term does push the cold items down: the check has teeth
    r = kept.rank(hists, n_candidates=n)
    ok = np.isfinite(r.score)
    np.testing.assert_allclose(sum(r.parts.values())[ok], r.score[ok], rtol=1e-5, atol=1e-5)


def test_validation_takes_slots_where_the_warm_advantage_hides_cold_targets_and_no_bonus_is_tried():
    """Every warm item above every cold one and no bonus to try: a made-cold target (the text twin of the
    history item) ranks below all warm items, while warm-target users find their target first. A slot every
    `e` positions lifts the best cold candidate, the twin, to exactly position e (NDCG 1 / log2(e + 1)) at no
    cost to them: validation takes the most slots (every 3rd position) and leaves the model as it was."""
    items, df = _twins()
    train = df[df[USER_ID].isin([f"u{u}" for u in range(200)])]
    rest = df[~df[USER_ID].isin(train[USER_ID])]
    val = build_validation(pd.concat([train, rest[rest[TS] == 1]]), rest[rest[TS] == 2], items, max_len=4)
    model = _model(items, 1.0)
    _, info = tune_cold_bonus(model, val, None, n_candidates=items.n_items, grid=(0.0,), frac=0.2,
                              min_targets=20, every_grid=(0, 10, 5, 3))
    assert info["measured"] and info["every_grid"] == [0, 10, 5, 3]
    cold = {int(e): v[0] for e, v in info["val_ndcg_cold_targets_by_every"].items()}
    assert cold[0] == 0.0
    for e in (10, 5, 3):
        assert cold[e] == pytest.approx(1 / np.log2(e + 1)), cold
    overall = info["val_ndcg_by_every"]
    assert overall["3"][0] > overall["0"][0]
    assert info["cold_every"] == 3 and model.cfg.cold_every == 0
    # the overall NDCG is the users' mean: warm-target and made-cold-target users weighted by their numbers
    n_cold = info["n_cold_targets"]
    warm_part = np.array(info["val_ndcg_warm_targets"]) * (val.n_users - n_cold)
    np.testing.assert_allclose((warm_part + np.array(info["val_ndcg_cold_targets"]) * n_cold) / val.n_users,
                               info["val_ndcg"])
    # judged on the warm-target users alone (the stricter rule), the slots still cost them nothing here
    _, warm_info = tune_cold_bonus(model, val, None, n_candidates=items.n_items, grid=(0.0,), frac=0.2,
                                   min_targets=20, every_grid=(0, 10, 5, 3), tie_on="warm")
    assert warm_info["cold_every"] == 3 and warm_info["tie_on"] == "warm"
    with pytest.raises(ValueError, match="tie_on must be 'all' or 'warm', got 'cold'"):
        tune_cold_bonus(model, val, None, n_candidates=items.n_items, grid=(0.0,), frac=0.2, min_targets=20,
                        tie_on="cold")


def test_held_out_validation_judges_its_own_cold_targets_and_picks_the_best_bonus():
    """frac 0 (the cold protocol's held-out validation, llmrec.eval.cold_choice): no item is made cold; the
    cold targets are the validation's own items without an ID embedding, every user here has one, and the
    pick is the bonus with the best NDCG of the served ranking (brute force: `served_val_ndcg` per bonus),
    the larger bonus on exact ties."""
    import dataclasses

    from llmrec.scorer.finalize import served_val_ndcg

    items, df = _twins()
    n = items.n_items
    model = _model(items, 1.0)
    never = np.arange(1, n, 4)  # items never trained: no ID embedding
    model.id_slots[torch.as_tensor(never)] = 0
    names = {f"i{i}" for i in never}
    hist, nxt = df[df[TS] == 1], df[df[TS] == 2]
    users = nxt.loc[nxt[ITEM_ID].isin(names), USER_ID]
    val = build_validation(hist[hist[USER_ID].isin(users)], nxt[nxt[USER_ID].isin(users)], items, max_len=4)
    grid = (0.0, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2)
    slots = model.id_slots.clone()
    bonus, info = tune_cold_bonus(model, val, None, n_candidates=n, grid=grid, frac=0.0, min_targets=20,
                                  every_grid=(0,), keep_grid=(0.0,))
    assert info["measured"] and info["n_pseudo_cold_items"] == 0 and info["n_cold_targets"] == val.n_users
    assert val.n_users == len(users) > 20
    ref = []
    for g in grid:
        m = _model(items, 1.0, cold_bonus=g)
        m.id_slots.copy_(slots)
        ref.append(float(served_val_ndcg(m, val, None, None, n_candidates=n).mean()))
    np.testing.assert_allclose(info["val_ndcg"], ref)
    np.testing.assert_allclose(info["val_ndcg_cold_targets"], ref)  # every target is cold
    assert bonus == max(grid, key=lambda g: (ref[grid.index(g)], g))
    assert ref[grid.index(bonus)] > ref[0] + 0.2  # the warm items' ID advantage hid the never-trained targets
    assert torch.equal(model.id_slots, slots) and model.cfg == dataclasses.replace(model.cfg, cold_bonus=0.0)


def test_scorer_choose_replaces_choices_and_drops_what_it_cached_from_them():
    """Scorer.choose (a cold-item choice made on another validation): the ranking equals that of a scorer
    built with those values, although the old imputation's text neighbours were cached by an earlier call."""
    import dataclasses

    import scipy.sparse as sp

    from llmrec.protocol import History
    from llmrec.scorer.inference import Scorer

    items, _ = _twins(n_pairs=15)
    n = items.n_items
    base = _model(items, 0.5, cold_impute_k=3)
    cold = np.arange(1, n, 4)
    keep = np.ones(n, dtype=np.float32)
    keep[cold] = 0
    sim = sp.random(n, n, density=0.3, random_state=4, format="csr", dtype=np.float32)
    sim = (sp.diags(keep) @ sim @ sp.diags(keep)).tocsr()

    def scorer(**fields) -> Scorer:
        cfg = dataclasses.replace(base.cfg, cooc_weight=2.0, **fields)
        m = ScorerModel(cfg, base.text_vectors, base.id_slots.clone())
        m.id_slots[torch.as_tensor(cold)] = 0
        m.load_state_dict({k: v for k, v in base.state_dict().items() if k != "id_slots"}, strict=False)
        return Scorer(m.eval(), items.item_ids, cooc=sim)

    rng = np.random.default_rng(5)
    hists = [History(f"u{b}", rng.choice(n, size=2, replace=False), np.array([1, 2]),
                     np.array(["like", "like"]), np.array([np.nan, np.nan])) for b in range(10)]
    s = scorer(cooc_impute=1.0)
    before = s.rank(hists, n_candidates=n).score  # caches the imputation's neighbours, weighted by 1.0
    want = dict(cooc_impute=4.0, cold_bonus=0.3, cold_every=3, cold_keep=1.5)
    s.choose(**want)
    got = s.rank(hists, n_candidates=n).score
    ref = scorer(**want).rank(hists, n_candidates=n).score
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    assert not np.allclose(np.nan_to_num(got, neginf=0), np.nan_to_num(before, neginf=0))
    assert all(getattr(s.model.cfg, k) == v for k, v in want.items())
    with pytest.raises(TypeError, match="cold_place"):
        s.choose(cold_place=1)
