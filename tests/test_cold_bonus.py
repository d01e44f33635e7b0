"""The cold-item bonus: what it adds to a ranking, and how validation chooses it (tune_cold_bonus)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from llmrec.protocol import ItemSpace
from llmrec.schema import EVENT, ITEM_ID, RATING, TS, USER_ID
from llmrec.scorer.data import build_validation
from llmrec.scorer.finalize import tune_cold_bonus
from llmrec.scorer.model import ScorerConfig, ScorerModel, two_stage_rank


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
    c = ScorerConfig(text_dim=16, n_items=n, n_id_slots=n + 1, dim=8, max_len=4, rerank=False,
                     cold_impute_k=0, **cfg)
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
                                  min_targets=20)
    assert info["measured"] and info["n_pseudo_cold_items"] == 12 and info["n_cold_targets"] >= 20
    ndcg, cold_ndcg = info["val_ndcg"], info["val_ndcg_cold_targets"]
    # without a bonus the made-cold twins fall below every warm item; the chosen bonus brings them back
    assert cold_ndcg[0] < 0.5 < cold_ndcg[grid.index(bonus)]
    assert ndcg[grid.index(bonus)] > ndcg[0]
    # a bonus far above the warm advantage floods every list with cold items: warm-target users pay, and the
    # overall NDCG (not the cold targets' alone, which only grows) refuses it
    assert bonus < 3.2 and ndcg[-1] < max(ndcg)
    assert torch.equal(model.id_slots, slots) and model.cfg.cold_bonus == 0.0  # the model is left as it was
