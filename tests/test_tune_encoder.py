"""Text-encoder fine-tuning (`llmrec.finetune.tune`, `llmrec tune-encoder`): pairs against hand-computed
ones, the loss against a direct computation, a tune that learns planted structure (and one that cannot,
which keeps the frozen weights), and the whole command on Ray with the tuned folder read back by
`llmrec embed`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from llmrec.config import EncoderTuneConfig
from llmrec.finetune.tune import TunePairs, build_pairs, contrastive_loss

TOPICS = [
    "apple banana cherry grape lemon mango",
    "river mountain forest valley ocean desert",
    "guitar piano violin drum flute trumpet",
    "soccer tennis hockey rugby cricket golf",
    "doctor nurse surgeon patient clinic hospital",
    "rocket planet comet galaxy orbit asteroid",
]
NOISE = "table chair window door paper pencil market street house garden".split()


def _events(rows: list[tuple[str, str, int, str]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["user_id", "item_id", "ts", "event"]).assign(rating=np.nan)


def test_build_pairs_hand_computed() -> None:
    ids = np.array(["i0", "i1", "i2", "i3", "i4", "i5"])
    df = _events([
        # a: 5 events -> test i5, validation i4, training i1 i2 i3 -> pairs (1,2) (2,3); val (3,4)
        ("a", "i1", 1, "like"), ("a", "i2", 2, "view"), ("a", "i3", 3, "like"), ("a", "i4", 4, "like"),
        ("a", "i5", 5, "like"),
        # b: test i4, validation i2; training i2 + a dislike of i3 (not a target kind): no pair; the
        # validation item equals the context (i2), so no validation pair either
        ("b", "i2", 1, "like"), ("b", "i3", 2, "dislike"), ("b", "i2", 3, "like"), ("b", "i4", 4, "like"),
        # c: 2 events, all training -> (1,3); d: the same item twice -> no pair
        ("c", "i1", 1, "like"), ("c", "i3", 2, "like"),
        ("d", "i0", 1, "like"), ("d", "i0", 2, "like"),
    ])
    p = build_pairs(df, ids, seed=0)
    assert sorted(map(tuple, p.train.tolist())) == [(1, 2), (1, 3), (2, 3)]
    assert p.val.tolist() == [[3, 4]]
    assert p.stats["n_train_pairs"] == 3 and p.stats["n_val_pairs"] == 1


def test_build_pairs_unknown_item_and_no_pairs() -> None:
    ids = np.array(["i0", "i1"])
    with pytest.raises(ValueError, match=r"1 interactions name 1 items outside the catalog .*'zz'"):
        build_pairs(_events([("a", "i0", 1, "like"), ("a", "zz", 2, "like")]), ids)
    with pytest.raises(ValueError, match="no training pairs"):
        build_pairs(_events([("a", "i0", 1, "like"), ("b", "i1", 2, "like")]), ids)


def test_contrastive_loss_matches_direct_computation() -> None:
    import torch

    rng = np.random.default_rng(0)
    c = rng.normal(size=(4, 5))
    n = rng.normal(size=(4, 5))
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    n /= np.linalg.norm(n, axis=1, keepdims=True)
    ci, ni = np.array([0, 1, 2, 3]), np.array([7, 8, 7, 9])  # rows 0 and 2 share their next item
    t = 0.1
    got = float(contrastive_loss(torch.tensor(c), torch.tensor(n), torch.tensor(ci), torch.tensor(ni), t))
    logits = c @ n.T / t

    def ce(lg: np.ndarray, dup: np.ndarray) -> float:
        out = []
        for i in range(len(lg)):
            keep = [j for j in range(len(lg)) if j == i or not dup[i, j]]
            out.append(-(lg[i, i] - np.log(np.exp(lg[i, keep]).sum())))
        return float(np.mean(out))

    dup_f = (ni[None, :] == ni[:, None]) & ~np.eye(4, dtype=bool)
    dup_b = (ci[None, :] == ci[:, None]) & ~np.eye(4, dtype=bool)
    assert got == pytest.approx((ce(logits, dup_f) + ce(logits.T, dup_b)) / 2, rel=1e-6)


def _planted(
    n_per_topic: int = 12, n_users: int = 160, seed: int = 0
) -> tuple[list[str], np.ndarray, TunePairs]:
    """Items of 6 topics (3 topic words + 3 noise words each); pairs are two items of the same topic."""
    rng = np.random.default_rng(seed)
    texts, topic = [], []
    for t, words in enumerate(TOPICS):
        w = words.split()
        for _ in range(n_per_topic):
            texts.append(" ".join(list(rng.choice(w, 2, replace=False)) + list(rng.choice(NOISE, 4))))
            topic.append(t)
    topic = np.array(topic)

    def draw(n: int) -> np.ndarray:
        t = rng.integers(0, len(TOPICS), n)
        a = np.array([rng.choice(np.flatnonzero(topic == x)) for x in t])
        rows = np.arange(len(topic))
        b = np.array([rng.choice(np.flatnonzero((topic == x) & (rows != i)))
                      for x, i in zip(t, a, strict=True)])
        return np.stack([a, b], axis=1)

    return texts, topic, TunePairs(train=draw(n_users * 3), val=draw(120))


def test_frozen_bottom_cache_reproduces_the_forward(tiny_model_dir: str) -> None:
    """The cached lower layers + the top layer give the encoder's own vectors, with and without autograd."""
    import torch

    from llmrec.embed.encoder import TextEncoder
    from llmrec.finetune.tune import FrozenBottom

    texts, _, _ = _planted(n_per_topic=5)
    enc = TextEncoder(tiny_model_dir, device="cpu", max_length=16)
    bottom = FrozenBottom(enc, texts, train_layers=1)
    assert bottom.ok and bottom.k == 1
    rows = np.arange(len(texts))
    with torch.no_grad():
        got = bottom.embed(rows, grad=False).numpy()
    np.testing.assert_allclose(got, enc.encode(texts), atol=1e-5)
    with_grad = bottom.embed(rows[:6])
    assert with_grad.requires_grad
    np.testing.assert_allclose(with_grad.detach().numpy(), got[:6], atol=1e-5)


@pytest.mark.parametrize("cache", [True, False], ids=["cached-bottom", "whole-model"])
def test_tune_learns_planted_topics_and_saves_a_model_folder(
    tiny_model_dir: str, tmp_path: Path, cache: bool
) -> None:
    from llmrec.embed.encoder import TextEncoder
    from llmrec.finetune.tune import save_tuned, tune_loop

    texts, _, pairs = _planted()
    enc = TextEncoder(tiny_model_dir, device="cpu", max_length=16)
    before = enc.encode(texts)
    cfg = EncoderTuneConfig(train_layers=2, max_steps=120, batch_size=32, lr=1e-3, eval_every=40,
                            temperature=0.1, cache_max_bytes=(2 << 30) if cache else 0)
    res = tune_loop(enc, texts, pairs, cfg)
    assert res.improved and res.best_step > 0
    assert res.best_metrics["ndcg@10"] > res.frozen_metrics["ndcg@10"] + 0.05, res.history
    assert [h["step"] for h in res.history] == [0, 40, 80, 120]
    after = enc.encode(texts)  # the encoder leaves with the best pass's weights
    assert not np.allclose(after, before, atol=1e-4)
    out = save_tuned(enc, tmp_path / "tuned")
    again = TextEncoder(out, device="cpu", max_length=16).encode(texts)
    np.testing.assert_allclose(again, after, atol=1e-5)


def test_tune_that_cannot_help_keeps_the_frozen_encoder(tiny_model_dir: str) -> None:
    from llmrec.embed.encoder import TextEncoder
    from llmrec.finetune.tune import tune_loop

    texts, _, pairs = _planted()
    enc = TextEncoder(tiny_model_dir, device="cpu", max_length=16)
    before = enc.encode(texts)
    # the best pass needs to be strictly better than step 0; with a vanishing step nothing is
    res = tune_loop(enc, texts, pairs, EncoderTuneConfig(max_steps=4, eval_every=2, lr=1e-12))
    assert not res.improved and res.best_step == 0
    np.testing.assert_allclose(enc.encode(texts), before, atol=1e-6)


def test_tune_encoder_command_then_embed_with_it(tiny_model_dir: str, tmp_path: Path, ray_local) -> None:
    """`llmrec tune-encoder` on Ray Train writes a model folder that `llmrec embed --model` encodes with."""
    from llmrec.cli import main
    from llmrec.data.tables import write_interactions, write_items
    from llmrec.embed.encoder import TextEncoder

    texts, topic, _ = _planted(n_per_topic=8)
    ids = [f"it{i:03d}" for i in range(len(texts))]
    items = pd.DataFrame({"item_id": ids, "text": texts, "title": ids})
    rng = np.random.default_rng(1)
    rows = []
    for u in range(120):  # each user takes 4 items of one topic
        t = rng.integers(0, len(TOPICS))
        for k, i in enumerate(rng.choice(np.flatnonzero(topic == t), 4, replace=False)):
            rows.append((f"u{u}", ids[i], 1000 + k, "like"))
    data = tmp_path / "data"
    write_items(items, data)
    write_interactions(_events(rows), data)
    enc_dir, emb_dir = tmp_path / "encoder", tmp_path / "emb"
    assert main(["tune-encoder", "--data", str(data), "--out", str(enc_dir), "--model", tiny_model_dir,
                 "--max-steps", "60", "--eval-every", "30", "--lr", "1e-3", "--max-length", "16"]) == 0
    meta = json.loads((enc_dir / "meta.json").read_text())
    # 4 events per user: the last two held out (test, validation), so one training pair each
    assert meta["stage"] == "tune-encoder" and meta["pairs"]["n_train_pairs"] == 120
    assert meta["pairs"]["n_val_pairs"] == 120 and [h["step"] for h in meta["history"]] == [0, 30, 60]
    assert meta["improved"] is (meta["val_best"]["ndcg@10"] > meta["val_frozen"]["ndcg@10"])
    assert main(["embed", "--items", str(data), "--out", str(emb_dir), "--model", str(enc_dir),
                 "--max-length", "16", "--device", "cpu"]) == 0
    emb_meta = json.loads((emb_dir / "meta.json").read_text())
    assert emb_meta["model_path"] == str(enc_dir.resolve())
    from llmrec.embed.artifact import load_embeddings

    got = load_embeddings(emb_dir)
    got_ids, vecs = got.item_ids, got.vectors
    want = TextEncoder(enc_dir, device="cpu", max_length=16).encode(texts)
    pos = {i: k for k, i in enumerate(ids)}
    np.testing.assert_allclose(vecs, want[[pos[i] for i in got_ids]], atol=1e-5)


def test_evaluate_refuses_splits_a_tuned_encoder_learnt_from(tmp_path: Path) -> None:
    """Embeddings of a tuned encoder are evaluated only on the split it held out (loo, its seed)."""
    from llmrec.artifacts import write_meta
    from llmrec.eval.evaluate import check_tuned_encoder

    enc = tmp_path / "encoder"
    enc.mkdir()
    write_meta(enc, "tune-encoder", pairs={"seed": 3})
    meta = {"model_path": str(enc)}
    check_tuned_encoder(meta, ["loo"], [3])  # the split it held out
    with pytest.raises(ValueError, match=r"seed 3 .*\['time'\] would score events it learnt from"):
        check_tuned_encoder(meta, ["loo", "time"], [3])
    with pytest.raises(ValueError, match=r"\['seed 4'\]"):
        check_tuned_encoder(meta, ["loo"], [3, 4])
    other = tmp_path / "plain-model"  # a model folder llmrec did not tune: nothing to check
    other.mkdir()
    check_tuned_encoder({"model_path": str(other)}, ["loo", "time"], [0, 1])


def test_pipeline_tune_encoder_embeds_with_it_and_allows_only_fast_eval(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from llmrec.cli import build_parser, main
    from llmrec.commands.pipeline import stage_argv

    base = ["pipeline", "--dataset", "movielens-latest-small", "--source", str(tmp_path / "src"),
            "--out", str(tmp_path / "run")]
    plain = stage_argv(build_parser().parse_args(base), "run")
    tuned = stage_argv(build_parser().parse_args([*base, "--tune-encoder"]), "run")
    assert "--model" not in plain["embed"]
    assert tuned["tune-encoder"] == ["tune-encoder", "--data", "run/data", "--out", "run/encoder"]
    assert tuned["embed"][tuned["embed"].index("--model") + 1] == "run/encoder"
    assert main([*base, "--tune-encoder", "--eval", "full"]) == 2
    assert "--tune-encoder evaluates only with --eval fast" in capsys.readouterr().err
    assert not (tmp_path / "run" / "data").exists()  # refused before any stage ran
