"""Scorer core without Ray: shapes, overfitting planted pairs, beating popularity, cold items from text."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from llmrec.eval.protocol import History, ItemSpace
from llmrec.schema import EVENT, ITEM_ID, RATING, TS, USER_ID
from llmrec.scorer.data import build_samples, pad_histories
from llmrec.scorer.model import EVENT_INDEX, ScorerConfig, ScorerModel, two_stage_rank
from llmrec.scorer.train import batch_loss

SMALL = {"dim": 16, "max_len": 10, "n_neg": 32, "head_neg": 7, "mlp_hidden": 32, "n_candidates": 20}


def planted(
    n_items: int = 120,
    n_topics: int = 6,
    n_users: int = 90,
    events: int = 12,
    text_dim: int = 16,
    seed: int = 0,
) -> tuple[ItemSpace, pd.DataFrame, np.ndarray]:
    """Items in topics (text vector = topic centroid + noise, L2-normalised); each user walks one topic.

    Item popularity is Zipf-skewed inside each topic, so a popularity ranking is a fair but weak reference.
    Returns (items, interactions, topic per item).
    """
    rng = np.random.default_rng(seed)
    topic = np.arange(n_items) % n_topics
    cent = rng.normal(size=(n_topics, text_dim))
    tv = cent[topic] + 0.6 * rng.normal(size=(n_items, text_dim))
    tv = (tv / np.linalg.norm(tv, axis=1, keepdims=True)).astype(np.float32)
    ids = np.array([f"i{i:04d}" for i in range(n_items)])
    rows = []
    for u in range(n_users):
        t = u % n_topics
        pool = np.flatnonzero(topic == t)
        w = 1.0 / np.arange(1, len(pool) + 1) ** 0.7
        seq = rng.choice(pool, size=min(events, len(pool)), replace=False, p=w / w.sum())
        for j, i in enumerate(seq):
            rows.append((f"u{u:04d}", ids[i], 1_700_000_000 + 60 * j, np.nan, "click"))
    df = pd.DataFrame(rows, columns=[USER_ID, ITEM_ID, TS, RATING, EVENT])
    return ItemSpace(ids, tv), df, topic


def _inputs(B: int, L: int, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randint(0, n, (B, L), generator=g),
        torch.full((B, L), EVENT_INDEX["click"]),
        torch.full((B, L), float("nan")),
        torch.randint(0, L + 1, (B,), generator=g),
    )


def test_forward_shapes_and_padding_invariance():
    torch.manual_seed(0)
    cfg = ScorerConfig(text_dim=12, n_items=40, n_id_slots=31, dim=16, max_len=8)
    slots = torch.cat([torch.arange(1, 31), torch.zeros(10, dtype=torch.long)])  # last 10 items cold
    m = ScorerModel(cfg, torch.randn(40, 12), slots).eval()
    hi, ev, rt, ln = _inputs(5, 8, 40)
    u = m.user_vectors(hi, ev, rt, ln)
    assert u.shape == (5, 16)
    assert m.all_item_reps().shape == (40, 16)
    assert m.head_scores(u, torch.randint(0, 40, (5, 7))).shape == (5, 7)
    cand = torch.cat([torch.randint(0, 40, (5,)), torch.randint(0, 40, (9,))])
    r, h = m(hi, ev, rt, ln, cand, head_neg=4)
    assert r.shape == (5, 14) and h.shape == (5, 5)
    # what sits in the padding must not change the user vector
    hi2 = hi.clone()
    for b in range(5):
        hi2[b, ln[b] :] = (hi2[b, ln[b] :] + 7) % 40
    torch.testing.assert_close(m.user_vectors(hi2, ev, rt, ln), u)
    # the retrieval logit equals scale * u . v (scale = the learned inverse temperature, 20 at init)
    assert float(m.scale.detach()) == pytest.approx(20.0)
    torch.testing.assert_close(r, m.scale * (u @ m.item_reps(cand).T))
    # cold items: representation = text projection only (slot 0 is a zero vector)
    torch.testing.assert_close(m.item_reps(torch.tensor([35])), m.text_reps(m.text_vectors[35:36]))


def test_config_and_input_errors_are_clear():
    with pytest.raises(ValueError, match="divisible by n_heads"):
        ScorerConfig(text_dim=4, n_items=3, n_id_slots=1, dim=15, n_heads=2)
    cfg = ScorerConfig(text_dim=4, n_items=3, n_id_slots=1, dim=8)
    with pytest.raises(ValueError, match="text_vectors shape"):
        ScorerModel(cfg, torch.randn(5, 4), torch.zeros(3, dtype=torch.long))
    h = History(
        "u", np.array([0, 1]), np.array([1, 2]), np.array(["click", "teleport"]), np.array([np.nan] * 2)
    )
    with pytest.raises(ValueError, match="unknown event kinds"):
        pad_histories([h], 4)


def test_build_samples_matches_hand_built_prefixes():
    items = ItemSpace(np.array(["a", "b", "c", "d"]), np.eye(4, dtype=np.float32))
    df = pd.DataFrame(
        {
            USER_ID: ["x", "x", "x", "x", "y", "y"],
            ITEM_ID: ["c", "a", "b", "d", "d", "a"],
            TS: [3, 1, 2, 4, 5, 6],
            RATING: [np.nan, 4.0, np.nan, np.nan, np.nan, np.nan],
            EVENT: ["click", "rating", "dislike", "like", "view", "view"],
        }
    )
    s = build_samples(df, items, max_len=2)
    # user x in time order: a(rating) b(dislike) c(click) d(like); the dislike is context, never a target
    assert s["target"].tolist() == [2, 3, 0]  # x: c, d ; y: a
    assert s["hist_len"].tolist() == [2, 2, 1]
    assert s["hist_idx"].tolist() == [[0, 1], [1, 2], [3, 0]]
    assert s["hist_event"][0].tolist() == [EVENT_INDEX["rating"], EVENT_INDEX["dislike"]]
    assert s["hist_rating"][0, 0] == 4.0 and np.isnan(s["hist_rating"][0, 1])
    bad = df.assign(**{ITEM_ID: ["zz"] + list(df[ITEM_ID][1:])})
    with pytest.raises(ValueError, match="not in the item space"):
        build_samples(bad, items)


def test_model_overfits_planted_pairs():
    """32 fixed (history -> next item) pairs: after 80 steps the positive is top-1 nearly always."""
    torch.manual_seed(0)
    n = 64
    cfg = ScorerConfig(
        text_dim=8, n_items=n, n_id_slots=n + 1, dim=32, max_len=4, id_dropout=0.0, dropout=0.0
    )
    m = ScorerModel(cfg, torch.randn(n, 8), torch.arange(1, n + 1))
    g = torch.Generator().manual_seed(1)
    batch = {
        "hist_idx": torch.randint(0, n, (32, 4), generator=g),
        "hist_event": torch.ones(32, 4, dtype=torch.long),
        "hist_rating": torch.zeros(32, 4),
        "hist_len": torch.full((32,), 4),
        "target": torch.randperm(n, generator=g)[:32],
    }
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    neg_p = torch.full((n,), 1.0 / n)
    first, gen = None, torch.Generator().manual_seed(2)
    for _ in range(80):
        loss = batch_loss(m, batch, neg_p, 16, gen, head_neg=7)
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    with torch.no_grad():
        u = m.user_vectors(batch["hist_idx"], batch["hist_event"], batch["hist_rating"], batch["hist_len"])
        top_r = (u @ m.all_item_reps().T).argmax(1)
        _, cand, head = two_stage_rank(m, u, m.all_item_reps(), None, 10)
        top_h = cand.gather(1, head.argmax(1, keepdim=True))[:, 0]
    assert float(loss.detach()) < 0.1 * first
    assert (top_r == batch["target"]).float().mean() >= 0.9  # retrieval over the whole catalog
    assert (top_h == batch["target"]).float().mean() >= 0.9  # MLP re-rank of the top 10


def test_full_scores_put_reranked_block_first_and_keep_retrieval_order_below():
    from llmrec.scorer.inference import Scorer

    torch.manual_seed(0)
    cfg = ScorerConfig(text_dim=8, n_items=50, n_id_slots=51, dim=16, max_len=6)
    s = Scorer(
        ScorerModel(cfg, torch.randn(50, 8), torch.arange(1, 51)), np.array([f"i{i}" for i in range(50)])
    )
    rng = np.random.default_rng(0)
    hists = [
        History(
            f"u{b}",
            rng.choice(50, 5, replace=False),
            np.arange(5),
            np.array(["click"] * 5),
            np.full(5, np.nan),
        )
        for b in range(3)
    ]
    S = s.full_scores(hists, n_candidates=10)
    idx, sc = s.recommend(hists, k=10, n_candidates=10)
    U, V = s.user_vectors(hists), s.item_vectors()
    for b, h in enumerate(hists):
        order = np.argsort(-S[b], kind="stable")
        np.testing.assert_array_equal(order[:10], idx[b])  # block = two-stage top 10, in MLP order
        np.testing.assert_allclose(S[b, idx[b]], sc[b], rtol=1e-5)
        rest = order[10:]
        ret = U[b] @ V.T
        assert np.all(np.diff(ret[rest]) <= 1e-5)  # below the block: retrieval order
        assert not np.isin(idx[b], h.item_idx).any()
    bad = History("x", np.array([0, 99]), np.arange(2), np.array(["click"] * 2), np.full(2, np.nan))
    with pytest.raises(ValueError, match="outside"):
        s.recommend([bad], k=3)


def test_rerank_off_ranks_by_retrieval_everywhere():
    import dataclasses

    from llmrec.scorer.inference import Scorer

    torch.manual_seed(0)
    cfg = ScorerConfig(text_dim=8, n_items=30, n_id_slots=31, dim=8, max_len=5, mlp_hidden=16)
    on = ScorerModel(cfg, torch.randn(30, 8), torch.arange(1, 31)).eval()
    off = ScorerModel(dataclasses.replace(cfg, rerank=False), on.text_vectors, on.id_slots).eval()
    off.load_state_dict(on.state_dict())
    u, reps = torch.randn(3, 8), off.all_item_reps()
    with torch.no_grad():
        retrieval, cand, head = two_stage_rank(off, u, reps, None, 10)
        torch.testing.assert_close(head, torch.gather(retrieval, 1, cand))  # reference: plain u.v
        _, cand_on, head_on = two_stage_rank(on, u, reps, None, 10)
        torch.testing.assert_close(head_on, on.head_pairs(u[:, None, :], reps[cand_on]))
    s = Scorer(off, np.array([f"i{i}" for i in range(30)]))
    idx = np.arange(6).reshape(3, 2)
    np.testing.assert_allclose(s.score(u.numpy(), idx), (u.numpy()[:, None, :] * reps.detach().numpy()[idx]).sum(-1),
                               rtol=1e-5, atol=1e-6)


def test_warm_start_reproduces_the_zero_shot_text_model():
    """After warm_start (and with the small random event/position embeddings zeroed) u.v equals the dot product
    of the mean history text vector with the item text vector, brute-force computed in numpy."""
    torch.manual_seed(0)
    n, D = 30, 12
    text = torch.nn.functional.normalize(torch.randn(n, D), dim=1)
    cfg = ScorerConfig(text_dim=D, n_items=n, n_id_slots=1, dim=D, max_len=8, dropout=0.0, id_dropout=0.0)
    m = ScorerModel(cfg, text, torch.zeros(n, dtype=torch.long))
    m.warm_start()
    with torch.no_grad():
        m.event_emb.weight.zero_()
        m.pos_emb.weight.zero_()
    m.eval()
    hi, ev, rt, ln = _inputs(6, 8, n, seed=3)
    ln = ln.clamp(min=1)
    u = m.user_vectors(hi, ev, rt, ln)
    scores = (u @ m.all_item_reps().T).detach().numpy()
    t = text.numpy()
    ref = np.stack([t[hi[b, : ln[b]].numpy()].mean(0) @ t.T for b in range(6)])
    np.testing.assert_allclose(scores, ref, atol=1e-5)


def test_head_loss_does_not_reach_the_retrieval_towers():
    """The re-ranker trains on detached u, v: its loss alone leaves text_proj / encoder / scale gradients None,
    while the retrieval loss does reach them."""
    torch.manual_seed(0)
    cfg = ScorerConfig(text_dim=12, n_items=40, n_id_slots=41, dim=16, max_len=8)
    m = ScorerModel(cfg, torch.randn(40, 12), torch.arange(1, 41))
    hi, ev, rt, ln = _inputs(5, 8, 40)
    cand = torch.cat([torch.arange(5), torch.randint(5, 40, (9,))])
    retrieval, head = m(hi, ev, rt, ln, cand, head_neg=4)
    torch.nn.functional.cross_entropy(head, torch.zeros(5, dtype=torch.long)).backward(retain_graph=True)
    assert m.text_proj.weight.grad is None and m.out.weight.grad is None and m.log_scale.grad is None
    assert m.mlp[0].weight.grad is not None and float(m.mlp[0].weight.grad.abs().sum()) > 0
    torch.nn.functional.cross_entropy(retrieval, torch.arange(5)).backward()
    assert float(m.text_proj.weight.grad.abs().sum()) > 0 and m.log_scale.grad is not None


def test_full_softmax_loss_equals_brute_force_cross_entropy():
    """n_neg = -1 trains on the whole catalog: the retrieval part of the loss is the softmax cross-entropy of
    scale * u.v over every item (no sampling, no logQ), computed here by hand; the head part is >= 0."""
    torch.manual_seed(0)
    n = 25
    cfg = ScorerConfig(text_dim=8, n_items=n, n_id_slots=n + 1, dim=8, max_len=6, dropout=0.0, id_dropout=0.0)
    m = ScorerModel(cfg, torch.randn(n, 8), torch.arange(1, n + 1))
    hi, ev, rt, ln = _inputs(4, 6, n, seed=1)
    batch = {"hist_idx": hi, "hist_event": ev, "hist_rating": rt, "hist_len": ln,
             "target": torch.tensor([3, 3, 17, 0])}
    neg_p = torch.full((n,), 1.0 / n)
    gen = torch.Generator().manual_seed(0)
    loss = batch_loss(m, batch, neg_p, -1, gen, head_neg=0)  # head_neg 0: head term is exactly 0
    with torch.no_grad():
        u = m.user_vectors(hi, ev, rt, ln)
        logits = m.scale * u @ m.all_item_reps().T  # (4, n)
        ref = -(logits.log_softmax(1)[torch.arange(4), batch["target"]]).mean()
    assert float(loss) == pytest.approx(float(ref), rel=1e-5)


def test_head_trains_on_the_retrieval_top_list_it_reranks():
    """Head negatives are drawn from the row's retrieval top-`head_pool` over the whole catalog (history
    excluded), exactly the candidates two_stage_rank hands the head at inference; a row whose positive is not
    in that list gets constant zero head logits (no gradient)."""
    torch.manual_seed(0)
    n, pool = 60, 8
    cfg = ScorerConfig(text_dim=12, n_items=n, n_id_slots=n + 1, dim=16, max_len=6, dropout=0.0, id_dropout=0.0)
    m = ScorerModel(cfg, torch.randn(n, 12), torch.arange(1, n + 1))
    hi, ev, rt, ln = _inputs(24, 6, n, seed=5)
    ln = ln.clamp(min=1)
    with torch.no_grad():
        u = m.user_vectors(hi, ev, rt, ln)
        reps = m.all_item_reps()
        excl = torch.zeros(24, n, dtype=torch.bool)
        for b in range(24):
            excl[b, hi[b, : ln[b]]] = True
        _, top, _ = two_stage_rank(m, u, reps, excl, pool)  # (24, pool) what the head re-ranks at inference
    # positives: half the rows take an item of their top list, half an item outside it (and not in history)
    target = torch.empty(24, dtype=torch.long)
    for b in range(24):
        outside = [i for i in range(n) if i not in set(top[b].tolist()) and not excl[b, i]]
        target[b] = top[b, 3] if b % 2 == 0 else outside[0]
    cand = torch.cat([target, torch.arange(n)])
    _, head = m(hi, ev, rt, ln, cand, head_neg=5, head_pool=pool)  # (24, 6)
    with torch.no_grad():
        every = m.head_pairs(u[:, None, :], reps[None, :, :])  # (24, n) head score of every item
    for b in range(24):
        if b % 2:
            assert torch.equal(head[b], torch.zeros(6))
            continue
        assert float(head[b, 0]) == pytest.approx(float(every[b, target[b]]), abs=1e-5)
        allowed = every[b, [i for i in top[b].tolist() if i != int(target[b])]]
        for x in head[b, 1:]:  # every negative is a top-list item other than the positive
            assert torch.isclose(allowed, x, atol=1e-5).any()
    head.sum().backward()
    assert m.mlp[0].weight.grad is not None and float(m.mlp[0].weight.grad.abs().sum()) > 0
