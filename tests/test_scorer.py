"""Scorer core without Ray: shapes, overfitting planted pairs, beating popularity, cold items from text."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from llmrec.protocol import History, ItemSpace
from llmrec.schema import EVENT, ITEM_ID, RATING, TS, USER_ID
from llmrec.scorer.data import build_samples, pad_histories
from llmrec.scorer.loss import batch_loss
from llmrec.scorer.model import EVENT_INDEX, ScorerConfig, ScorerModel, two_stage_rank

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


@pytest.mark.parametrize("encoder", ["transformer", "gru"])
def test_forward_shapes_and_padding_invariance(encoder):
    torch.manual_seed(0)
    cfg = ScorerConfig(text_dim=12, n_items=40, n_id_slots=31, dim=16, max_len=8, user_encoder=encoder,
                       n_layers=2)
    slots = torch.cat([torch.arange(1, 31), torch.zeros(10, dtype=torch.long)])  # last 10 items cold
    m = ScorerModel(cfg, torch.randn(40, 12), slots).eval()
    hi, ev, rt, ln = _inputs(5, 8, 40)
    u = m.user_vectors(hi, ev, rt, ln)
    assert u.shape == (5, 16 + 12) and cfg.retrieval_dim == 28  # [behaviour (d); text (D)]
    assert m.all_item_reps().shape == (40, 28)
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
    # cold items without neighbour borrowing: representation = text only (slot 0 is a zero vector)
    import dataclasses

    m0 = ScorerModel(dataclasses.replace(cfg, cold_impute_k=0), m.text_vectors, m.id_slots).eval()
    m0.load_state_dict(m.state_dict())
    torch.testing.assert_close(m0.item_reps(torch.tensor([35])), m0.text_reps(m0.text_vectors[35:36]))


def test_cold_items_borrow_the_id_vectors_of_their_text_neighbours():
    """At inference a cold item's ID part is the softmax(cos / 0.05)-weighted mean of the gated ID vectors of
    its k nearest ID-carrying items by text (numpy brute force); in training it has none; a cold exact
    duplicate of a warm item scores like that item."""
    from llmrec.scorer.model import COLD_TEMPERATURE

    torch.manual_seed(0)
    n, D, k = 30, 12, 4
    text = torch.nn.functional.normalize(torch.randn(n, D), dim=1)
    text[29] = text[3]  # item 29 (cold) reads exactly like item 3 (warm)
    slots = torch.cat([torch.arange(1, 26), torch.zeros(5, dtype=torch.long)])  # items 25..29 cold
    counts = torch.cat([torch.full((25,), 50.0), torch.zeros(5)])
    cfg = ScorerConfig(text_dim=D, n_items=n, n_id_slots=26, dim=8, max_len=4, cold_impute_k=k, dropout=0.0)
    m = ScorerModel(cfg, text, slots, counts)
    with torch.no_grad():
        torch.nn.init.normal_(m.id_emb.weight)
        m.id_emb.weight[0].zero_()
    m.eval()
    with torch.no_grad():
        v = m.all_item_reps()[:, :8]
        gate = counts / (counts + 1.0)
        ids = (gate[:, None] * m.id_emb.weight[slots]).numpy()
        t = text.numpy()
        for c in range(25, 30):
            sims = t[:25] @ t[c]
            top = np.argsort(-sims)[:k]
            w = np.exp((sims[top] - sims[top].max()) / COLD_TEMPERATURE)
            ref = (w[:, None] * ids[top]).sum(0) / w.sum()
            np.testing.assert_allclose(v[c].numpy() - m.text_proj(text[c]).numpy(), ref, atol=1e-5)
        u = torch.randn(3, cfg.retrieval_dim)
        reps = m.all_item_reps()
        s = u @ reps.T
        torch.testing.assert_close(s[:, 29], s[:, 3], atol=1e-3, rtol=1e-3)  # weight ~1 on the duplicate
        m.train()  # training: the dropout path, no borrowing
        torch.testing.assert_close(m.item_reps(torch.tensor([27]))[:, :8], m.text_proj(text[27:28]))


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


def _train_steps(m: ScorerModel, batch: dict, steps: int, head_neg: int) -> tuple[float, float]:
    """`steps` Adam steps (lr 1e-2) of `batch_loss` on one fixed batch, 16 uniform negatives (seeded); the
    model is left in eval mode. Returns (first loss, last loss)."""
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    neg_p = torch.full((m.cfg.n_items,), 1.0 / m.cfg.n_items)
    gen = torch.Generator().manual_seed(2)
    losses = []
    for _ in range(steps):
        loss = batch_loss(m, batch, neg_p, 16, gen, head_neg=head_neg)
        losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    return losses[0], losses[-1]


@pytest.mark.parametrize("encoder", ["transformer", "gru"])
def test_user_encoder_reads_the_order_of_the_history(encoder):
    """Every ordering of one item set, the target fixed by the newest item: a bag of the history (its mean)
    ranks the targets of the set's orderings alike, so at most 1 in 3 right; the sequence encoder must learn
    the order (top-1 >= 0.9)."""
    import itertools

    torch.manual_seed(0)
    n = 24
    cfg = ScorerConfig(text_dim=8, n_items=n, n_id_slots=n + 1, dim=32, max_len=3, id_dropout=0.0,
                       dropout=0.0, user_encoder=encoder, rare_dropout_c=0.0, text_arm=False)
    m = ScorerModel(cfg, torch.randn(n, 8), torch.arange(1, n + 1))
    hist = torch.tensor([p for s in ([0, 1, 2], [3, 4, 5], [6, 7, 8]) for p in itertools.permutations(s)])
    batch = {"hist_idx": hist, "hist_event": torch.ones_like(hist), "hist_rating": torch.zeros(hist.shape),
             "hist_len": torch.full((len(hist),), 3), "target": hist[:, -1] + 12}
    _train_steps(m, batch, steps=150, head_neg=0)
    with torch.no_grad():
        u = m.user_vectors(batch["hist_idx"], batch["hist_event"], batch["hist_rating"], batch["hist_len"])
        top = (u @ m.all_item_reps().T).argmax(1)
    assert (top == batch["target"]).float().mean() >= 0.9


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
    first, last = _train_steps(m, batch, steps=80, head_neg=7)
    with torch.no_grad():
        u = m.user_vectors(batch["hist_idx"], batch["hist_event"], batch["hist_rating"], batch["hist_len"])
        top_r = (u @ m.all_item_reps().T).argmax(1)
        _, cand, head = two_stage_rank(m, u, m.all_item_reps(), None, 10)
        top_h = cand.gather(1, head.argmax(1, keepdim=True))[:, 0]
    assert last < 0.1 * first
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
    u, reps = torch.randn(3, cfg.retrieval_dim), off.all_item_reps()
    with torch.no_grad():
        retrieval, cand, head = two_stage_rank(off, u, reps, None, 10)
        torch.testing.assert_close(head, torch.gather(retrieval, 1, cand))  # reference: plain u.v
        _, cand_on, head_on = two_stage_rank(on, u, reps, None, 10)
        torch.testing.assert_close(head_on, on.head_pairs(u[:, None, :], reps[cand_on]))
    s = Scorer(off, np.array([f"i{i}" for i in range(30)]))
    idx = np.arange(6).reshape(3, 2)
    np.testing.assert_allclose(s.score(u.numpy(), idx),
                               (u.numpy()[:, None, :] * reps.detach().numpy()[idx]).sum(-1),
                               rtol=1e-5, atol=1e-6)


def test_warm_start_reproduces_the_zero_shot_text_model():
    """After warm_start (and with the small random event/position embeddings zeroed) u.v equals the dot
    product of the mean history text vector with the item text vector, brute-force computed in numpy."""
    torch.manual_seed(0)
    n, D = 30, 12
    text = torch.nn.functional.normalize(torch.randn(n, D), dim=1)
    cfg = ScorerConfig(text_dim=D, n_items=n, n_id_slots=1, dim=D, max_len=8, dropout=0.0, id_dropout=0.0,
                       text_arm=False)
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
    """The re-ranker trains on detached u, v: its loss alone leaves text_proj / encoder / scale gradients
    None, while the retrieval loss does reach them."""
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
    cfg = ScorerConfig(
        text_dim=12, n_items=n, n_id_slots=n + 1, dim=16, max_len=6, dropout=0.0, id_dropout=0.0
    )
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


def _np_text_arm(m, hi, ev, ln, fb_vec=None, fb_pol=None):
    """Brute-force numpy twin of the text arm: beta(n) * unit recency-weighted history text mean (negative
    events subtract) + g+ * mean(positive texts) - g- * mean(negative texts) (recency by text position)."""
    from llmrec.scorer.model import FEEDBACK_HALF_LIFE, LEN_BUCKETS

    g = {k: v.detach().numpy() for k, v in m.text_gains().items()}
    t = m.text_vectors.numpy()
    out = []
    for b in range(hi.shape[0]):
        n = int(ln[b])
        acc = np.zeros(t.shape[1])
        for j in range(n):
            sign = -1.0 if int(ev[b, j]) in (EVENT_INDEX["dislike"], EVENT_INDEX["skip"]) else 1.0
            acc += 0.5 ** ((n - 1 - j) / m.cfg.text_half_life) * sign * t[int(hi[b, j])]
        norm = np.linalg.norm(acc)
        bucket = max(0, int(np.searchsorted(LEN_BUCKETS, n, side="right")) - 1)
        a = g["beta"][bucket] * (acc / norm if norm > 1e-12 else acc)
        if fb_vec is not None:
            for sign, key in ((1, "fb_pos"), (-1, "fb_neg")):
                rows = [j for j in range(fb_vec.shape[1]) if np.sign(fb_pol[b, j]) == sign]
                if rows:
                    w = np.array(
                        [0.5 ** ((len(rows) - 1 - r) / FEEDBACK_HALF_LIFE) for r in range(len(rows))]
                    )
                    e = (w[:, None] * fb_vec[b, rows].numpy()).sum(0) / w.sum()
                    a = a + sign * g[key] * e
        out.append(a)
    return np.stack(out)


def test_text_arm_matches_brute_force_and_feedback_moves_scores_by_its_gain():
    """The D-dim part of the user vector is the bounded-gain text arm (numpy reference); one negative text
    lowers every item's retrieval score by exactly g- times the item's cosine to the text, a positive one
    raises it."""
    torch.manual_seed(0)
    n, D = 30, 12
    text = torch.nn.functional.normalize(torch.randn(n, D), dim=1)
    cfg = ScorerConfig(text_dim=D, n_items=n, n_id_slots=n + 1, dim=8, max_len=8, dropout=0.0, id_dropout=0.0)
    m = ScorerModel(cfg, text, torch.arange(1, n + 1)).eval()
    hi, _, rt, ln = _inputs(6, 8, n, seed=2)
    ev = torch.full((6, 8), EVENT_INDEX["like"])
    ev[1, 0] = EVENT_INDEX["dislike"]  # a negative event subtracts its text
    with torch.no_grad():
        u = m.user_vectors(hi, ev, rt, ln)
        np.testing.assert_allclose(u[:, 8:].numpy(), _np_text_arm(m, hi, ev, ln), atol=1e-5)
        fb = torch.nn.functional.normalize(torch.randn(6, 3, D), dim=-1)
        pol = torch.tensor([[1, 0, 0], [-1, 0, 0], [1, -1, 1], [0, 0, 0], [-1, -1, 0], [1, 1, 1]]).float()
        u_fb = m.user_vectors(hi, ev, rt, ln, fb, pol)
        np.testing.assert_allclose(u_fb[:, 8:].numpy(), _np_text_arm(m, hi, ev, ln, fb, pol), atol=1e-5)
        reps = m.all_item_reps()
        delta = (u_fb - u) @ reps.T  # (6, n) change of every item's score
        g = m.text_gains()
        # the behaviour part's feedback maps start at zero, so the change is the text arm's alone
        torch.testing.assert_close(delta[0], g["fb_pos"] * (text @ fb[0, 0]), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(delta[1], -g["fb_neg"] * (text @ fb[1, 0]), atol=1e-5, rtol=1e-4)
        assert float(delta[3].abs().max()) == 0.0  # no text, no change
    for v in g.values():  # bounded gains
        assert 0 < float(v.min()) and float(v.max()) < cfg.text_gain_max


def test_id_gate_and_rare_item_dropout_follow_training_counts():
    """v = W t + n / (n + k0) * E_id: a cold item (n = 0) is its text projection exactly, a frequent item
    keeps almost all of its ID vector; in training rare items lose their ID more often than frequent ones."""
    torch.manual_seed(0)
    n, D = 6, 8
    cfg = ScorerConfig(text_dim=D, n_items=n, n_id_slots=n + 1, dim=8, max_len=4, id_dropout=0.3,
                       rare_dropout_c=2.0)
    counts = torch.tensor([0.0, 1.0, 3.0, 1000.0, 1.0, 1000.0])
    m = ScorerModel(cfg, torch.randn(n, D), torch.arange(1, n + 1), counts)
    with torch.no_grad():
        torch.nn.init.normal_(m.id_emb.weight)
        m.id_emb.weight[0].zero_()  # slot 0 = "no ID" stays a zero vector
    m.eval()
    with torch.no_grad():
        v = m.all_item_reps()[:, :8]
        base = m.text_proj(m.text_vectors)
        k0 = float(torch.nn.functional.softplus(m.id_gate_k))
        assert k0 == pytest.approx(1.0, rel=1e-5)
        for i in range(n):
            gate = float(counts[i]) / (float(counts[i]) + k0)
            torch.testing.assert_close(v[i], base[i] + gate * m.id_emb.weight[i + 1])
    m.train()
    kept = np.zeros(n)
    with torch.no_grad():
        for _ in range(400):
            r = m.item_reps(torch.arange(n))[:, :8] - m.text_proj(m.text_vectors)
            kept += (r.abs().sum(1) > 1e-6).numpy()
    keep = kept / 400  # expected 1 - (0.3 + 0.7 * 2 / (2 + n_i)): n=1 -> 0.233, n=3 -> 0.42, n=1000 -> 0.699
    assert kept[0] == 0  # a cold item has no ID vector to keep
    assert keep[1] == pytest.approx(0.233, abs=0.07) and keep[2] == pytest.approx(0.42, abs=0.08)
    assert keep[3] == pytest.approx(0.699, abs=0.08)


def test_cold_quota_reserves_candidates_for_cold_items():
    """With cold_quota q the candidate list is the top n - q by u.v plus the best q cold items outside it;
    without a quota the cold items would not be candidates at all."""
    import dataclasses

    torch.manual_seed(0)
    n, D = 40, 8
    slots = torch.cat([torch.arange(1, 31), torch.zeros(10, dtype=torch.long)])  # items 30..39 cold
    cfg = ScorerConfig(text_dim=D, n_items=n, n_id_slots=31, dim=8, max_len=4, rerank=False)
    m = ScorerModel(cfg, torch.randn(n, D), slots).eval()
    u = torch.randn(2, cfg.retrieval_dim)
    with torch.no_grad():
        reps = m.all_item_reps().clone()
        reps[30:] -= 100.0  # cold items score far below every warm one
        _, cand, _ = two_stage_rank(m, u, reps, None, 8)
        assert int((cand >= 30).sum()) == 0
        q = ScorerModel(dataclasses.replace(cfg, cold_quota=3), m.text_vectors, m.id_slots).eval()
        q.load_state_dict(m.state_dict())
        retrieval, cand_q, head = two_stage_rank(q, u, reps, None, 8)
    for b in range(2):
        ref_main = set(retrieval[b].topk(5).indices.tolist())
        ref_cold = set((retrieval[b, 30:].topk(3).indices + 30).tolist())
        assert set(cand_q[b, :5].tolist()) == ref_main and set(cand_q[b, 5:].tolist()) == ref_cold
        assert bool(head[b].isfinite().all())


def test_feedback_synthesis_points_at_or_away_from_the_target():
    """Positive texts name a facet of the next item; negative texts a facet it lacks (a history facet when
    there is one); vectors are the bank's phrase vectors of that facet."""
    from llmrec.scorer.feedback import build_bank, sample_feedback

    facets = [["a", "b"], ["a"], ["c"], ["c", "d"], ["b", "d"], []]
    names_seen = []

    def encode(texts):
        names_seen.extend(texts)
        return np.stack([np.full(4, float(len(t))) for t in texts]).astype(np.float32)

    bank = build_bank(facets, encode)
    assert bank.names == ["a", "b", "c", "d"] and bank.pos.shape == (4, 4, 4) and "no more a" in names_seen
    rng = np.random.default_rng(0)
    target = np.array([0, 1, 2, 3, 4, 5] * 50)
    hist = np.tile(np.array([[2, 3, 0]]), (300, 1))  # history items carry c, d, a, b
    vec, pol, facet = sample_feedback(bank, target, hist, np.full(300, 3), rng, p=1.0)
    assert (pol[:, 0] != 0).mean() > 0.8  # item 5 has no facet: only negative texts possible there
    for b in range(300):
        own = set(bank.facets_of(int(target[b])))
        if pol[b, 0] > 0:
            assert facet[b] in own
            assert any(np.allclose(vec[b, 0], v) for v in bank.pos[facet[b]])
        elif pol[b, 0] < 0:
            assert facet[b] not in own
            assert any(np.allclose(vec[b, 0], v) for v in bank.neg[facet[b]])
    assert abs((pol > 0).mean() - (pol < 0).mean()) < 0.2
