"""Ray Train path: fit_scorer on planted data (beats popularity), resume, artifact, cold items, workers."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
from test_scorer import SMALL, planted

from llmrec.config import TrainConfig
from llmrec.data.histories import attach_item_idx, make_histories
from llmrec.metrics import ndcg_at_k
from llmrec.protocol import ItemSpace
from llmrec.scorer.inference import Scorer
from llmrec.scorer.recommender import split_last_event
from llmrec.scorer.train import fit_scorer

EPOCHS_FIRST, EPOCHS_TOTAL = 2, 5


def _with_cold_twins(items: ItemSpace, twins: np.ndarray) -> ItemSpace:
    """Append one never-interacted item per `twins` entry with exactly that item's text vector."""
    ids = np.concatenate([items.item_ids, [f"cold-{i}" for i in twins]])
    tv = np.concatenate([items.text_vectors, items.text_vectors[twins]])
    return ItemSpace(ids, tv)


@pytest.fixture(scope="module")
def planted_split():
    items, df, topic = planted()
    items = _with_cold_twins(items, np.arange(6))  # a cold twin of item 0..5 (one per topic)
    trainval, test = split_last_event(df)
    train, valid = split_last_event(trainval)
    return items, topic, trainval, train, valid, test


@pytest.fixture(scope="module")
def trained(ray_local, planted_split, tmp_path_factory):
    """Train EPOCHS_FIRST epochs on a Ray Train worker, then resume from that output to EPOCHS_TOTAL (no
    early stop) in this process (Ray Train's local mode, `num_workers=0`: the same loop, the same file)."""
    items, _, _, train, valid, _ = planted_split
    out1 = tmp_path_factory.mktemp("scorer1")
    cfg = TrainConfig(epochs=EPOCHS_FIRST, batch_size=64, lr=1e-2, patience=10, **SMALL)
    meta1 = fit_scorer(cfg, train, items, out1, valid_df=valid)
    out2 = tmp_path_factory.mktemp("scorer2")
    # the resumed run: the same config with more epochs
    meta2 = fit_scorer(dataclasses.replace(cfg, epochs=EPOCHS_TOTAL, num_workers=0), train, items, out2,
                       valid_df=valid, resume_from=out1)
    return out1, meta1, out2, meta2


def _eval_ndcg(scores: np.ndarray, hist_df: pd.DataFrame, test: pd.DataFrame, items: ItemSpace) -> float:
    users = sorted(test["user_id"].unique())
    by_user = attach_item_idx(test, items).set_index("user_id")["item_idx"]
    hists = {h.user_id: h for h in make_histories(attach_item_idx(hist_df, items))}
    targets = [np.array([by_user[u]]) for u in users]
    exclude = [np.unique(hists[u].item_idx) for u in users]
    return ndcg_at_k(scores, targets, 10, exclude=exclude)


def test_resume_continues_epoch_counter(trained):
    out1, meta1, out2, meta2 = trained
    assert meta1["last_epoch"] == EPOCHS_FIRST - 1
    assert [h["epoch"] for h in meta2["history"]] == list(range(EPOCHS_TOTAL))  # carried over the resume
    assert meta2["last_epoch"] == EPOCHS_TOTAL - 1
    # the resumed run trained only the remaining epochs: its Ray run reported epochs 2..4, never 0
    assert meta1["epochs_run"] == list(range(EPOCHS_FIRST))
    assert meta2["epochs_run"] == list(range(EPOCHS_FIRST, EPOCHS_TOTAL))
    assert meta2["config"]["resumed_from"].endswith("checkpoint.pt")


def test_trained_scorer_beats_popularity(trained, planted_split):
    _, _, out2, meta2 = trained
    items, _, trainval, _, _, test = planted_split
    scorer = Scorer.load(out2)
    users = sorted(test["user_id"].unique())
    hists = {h.user_id: h for h in make_histories(attach_item_idx(trainval, items))}
    ours = np.stack([scorer.full_scores([hists[u]], n_candidates=SMALL["n_candidates"])[0] for u in users])
    counts = np.bincount(attach_item_idx(trainval, items)["item_idx"], minlength=items.n_items).astype(
        np.float32
    )
    pop = np.tile(counts, (len(users), 1))
    ndcg_ours = _eval_ndcg(ours, trainval, test, items)
    ndcg_pop = _eval_ndcg(pop, trainval, test, items)
    assert ndcg_ours >= 2 * ndcg_pop, (ndcg_ours, ndcg_pop)
    assert meta2["metrics"]["val_ndcg@10"] > 0


def test_artifact_and_inference_api(trained, planted_split):
    _, _, out2, meta2 = trained
    items, *_ = planted_split
    assert meta2["stage"] == "train" and (out2 / "model.pt").is_file()
    s = Scorer.load(out2)
    assert s.item_ids.tolist() == items.item_ids.astype(str).tolist()
    assert (
        s.text_dim == items.text_vectors.shape[1]
        and s.item_index("i0003") == 3
        and s.item_index("nope") is None
    )
    V = s.item_vectors()
    D = items.text_vectors.shape[1]
    assert V.shape == (items.n_items, SMALL["dim"] + D) and V.dtype == np.float32  # [behaviour; text]
    h = make_histories(attach_item_idx(planted_split[2], items))[:4]
    U = s.user_vectors(h)
    idx, sc = s.recommend(h, k=5, n_candidates=20)
    # the artifact ships the co-occurrence matrix; training chose its weight on validation
    w = s.model.cfg.cooc_weight
    assert (out2 / "cooc.npz").is_file() and s.cooc.shape == (items.n_items, items.n_items)
    assert meta2["cooc"]["cooc_weight"] == w and str(0) in meta2["cooc"]["val_ndcg_by_weight"]
    dense = s.cooc.toarray()
    no_data = (dense.sum(0) == 0) & (dense.sum(1) == 0)  # items without co-occurrence data (the cold twins)
    impute = s.model.cooc_impute(s.cooc)  # their text neighbours and weights (times cfg.cooc_impute)
    # reference: brute force two-stage with the public pieces (+ w * co-occurrence summed by hand; an item
    # without co-occurrence data borrows its text neighbours' scores as candidates)
    for b in range(4):
        hist = np.unique(h[b].item_idx)
        ret = U[b] @ V.T
        ret[hist] = -np.inf
        cand = np.argsort(-ret, kind="stable")[:20]
        co = dense[hist].sum(0)  # (N,)
        if impute is not None:
            nb, wt = impute
            co = np.where(no_data, (wt * co[nb]).sum(1), co)
        head = s.score(U[b : b + 1], cand[None])[0] + w * co[cand]
        np.testing.assert_allclose(
            s.score(U[b : b + 1], cand[None], history_items=[np.unique(h[b].item_idx)])[0], head, rtol=1e-5
        )
        np.testing.assert_array_equal(np.sort(idx[b]), np.sort(cand[np.argsort(-head)[:5]]))
        assert not np.isin(idx[b], h[b].item_idx).any()
        assert np.all(np.diff(sc[b]) <= 0)


def test_served_validation_file_equals_the_loaded_scorer_on_validation(trained, planted_split):
    """val_ndcg.npy holds each validation user's NDCG@10 under the final ranking as served (re-ranker,
    co-occurrence at its weight with the training matrix, text boost, cold bonus): the loaded Scorer, given
    the validation users' training histories and that matrix, reproduces it user by user."""
    from llmrec.metrics import recall_ndcg
    from llmrec.scorer.finalize import cooc_matrix

    _, _, out2, meta2 = trained
    items, _, _, train, valid, _ = planted_split
    per = np.load(out2 / "val_ndcg.npy")
    served = meta2["served_val"]
    users = sorted(valid["user_id"].astype(str).unique())
    assert served["n_users"] == len(per) == len(users) and served["file"] == "val_ndcg.npy"
    assert served["val_ndcg@10"] == pytest.approx(per.mean()) and len(served["targets_sha1"]) == 40
    loaded = Scorer.load(out2)
    term, k = meta2["cooc"]["term"], meta2["config"]["cooc_neighbors"]
    assert meta2["cooc"]["val_ndcg_by_term"][term] == max(meta2["cooc"]["val_ndcg_by_term"].values())
    # the shipped matrix is the chosen term over training + validation events
    np.testing.assert_allclose(loaded.cooc.toarray(), cooc_matrix(pd.concat([train, valid]), items, k, term)
                               .toarray(), rtol=1e-5, atol=1e-7)
    train_cooc = cooc_matrix(train, items, k, term)
    s = Scorer(loaded.model, loaded.item_ids, cooc=train_cooc)
    hists = {h.user_id: h for h in make_histories(attach_item_idx(train, items))}
    idx, _ = s.recommend([hists[u] for u in users], k=10, n_candidates=SMALL["n_candidates"])
    target = attach_item_idx(valid, items).set_index("user_id")["item_idx"]
    ref = np.array([recall_ndcg(idx[b], np.array([target[u]]), 10)[1] for b, u in enumerate(users)])
    np.testing.assert_allclose(per, ref, atol=1e-12)
    assert 0 < per.mean() < 1


def test_cold_item_with_liked_text_ranks_high(trained, planted_split):
    """Cold twins (no ID, never interacted) of item t share its text. Among the items a user has not seen, the
    twin of the user's topic ranks with that topic's items (top 20 of ~110, a topic has 20 items), far above
    the twins of the other topics."""
    _, _, out2, _ = trained
    items, topic, trainval, *_ = planted_split
    s = Scorer.load(out2)
    n_real = len(topic)
    hists = make_histories(attach_item_idx(trainval, items))
    ranks_own, ranks_other = [], []
    for h in hists:
        t = int(topic[h.item_idx[0]])
        sc = s.full_scores([h], n_candidates=SMALL["n_candidates"])[0]
        sc[np.unique(h.item_idx)] = -np.inf  # rank among unseen items, as evaluation does
        order = np.argsort(-sc, kind="stable")
        rank = np.empty(len(sc), int)
        rank[order] = np.arange(len(sc))
        ranks_own.append(rank[n_real + t])
        ranks_other.append(np.mean([rank[n_real + o] for o in range(6) if o != t]))
    assert np.median(ranks_own) < 20, np.median(ranks_own)
    assert np.median(ranks_own) < 0.25 * np.median(ranks_other), (
        np.median(ranks_own),
        np.median(ranks_other),
    )


def test_local_mode_trains_the_one_worker_model_in_this_process(trained, planted_split, tmp_path):
    """num_workers=0 (Ray Train's local mode: the same loop in this process, no worker actors) trains the
    model the 1-worker run trained (same samples in the same order, same seed: per-epoch metrics equal up to
    float summation order, as torch's thread count differs), keeps the best and the last checkpoint in the
    run's storage as Ray Train does (the fixture's second run resumed a worker-trained output in local mode).
    (Weights are not compared: Adam turns float noise in near-zero gradients into full-size steps.)"""
    out1, meta1, _, _ = trained
    items, _, _, train, valid, _ = planted_split
    cfg = TrainConfig(epochs=EPOCHS_FIRST, batch_size=64, lr=1e-2, patience=10, **{**SMALL, "num_workers": 0})
    meta = fit_scorer(cfg, train, items, tmp_path / "local", valid_df=valid)
    assert meta["config"]["num_workers"] == 0 and meta["epochs_run"] == list(range(EPOCHS_FIRST))
    for h0, h1 in zip(meta["history"], meta1["history"], strict=True):
        assert h0["train_loss"] == pytest.approx(h1["train_loss"], rel=1e-4)
        assert h0["val_ndcg@10"] == pytest.approx(h1["val_ndcg@10"], abs=1e-3)
    (run_dir,) = (tmp_path / "local" / "ray").iterdir()
    kept = sorted(p.name for p in run_dir.iterdir())
    best = f"checkpoint_{meta['best_epoch']:06d}"
    assert kept == sorted({best, f"checkpoint_{EPOCHS_FIRST - 1:06d}"})  # best and last, as num_to_keep=2
    with pytest.raises(ValueError, match="num_workers=0 .* cannot take use_gpu=True"):
        TrainConfig(num_workers=0, use_gpu=True)


def test_bad_input_errors(ray_local, planted_split, tmp_path):
    items, _, _, train, _, _ = planted_split
    with pytest.raises(TypeError, match="cfg must be a llmrec.config.TrainConfig, got DataFrame"):
        fit_scorer(train, items, tmp_path, TrainConfig(epochs=1))  # the call style before TrainConfig
    with pytest.raises(FileNotFoundError, match="checkpoint.pt"):
        fit_scorer(TrainConfig(epochs=1, **SMALL), train, items, tmp_path, resume_from=tmp_path)
    # the held-out cold-item choice is made above the scorer and handed in; never silently replaced
    with pytest.raises(ValueError, match="cold_choice=.held-out-new. needs the choice itself"):
        fit_scorer(TrainConfig(epochs=1, cold_choice="held-out-new", **SMALL), train, items, tmp_path)
    pick = ({"cold_bonus": 0.8, "cooc_impute": 0.0, "cold_every": 3, "cold_keep": 1.0}, {})
    with pytest.raises(ValueError, match="cold_pick is a held-out cold-item choice, but cfg.cold_choice"):
        fit_scorer(TrainConfig(epochs=1, **SMALL), train, items, tmp_path, cold_pick=pick)


@pytest.mark.slow
def test_one_and_two_workers_comparable(ray_local, planted_split, tmp_path):
    """Same global batch through 1 and 2 DDP workers: both clearly beat popularity on the validation users and
    land close to each other (the 90-user validation set is small, so the tolerance is loose)."""
    items, _, _, train, valid, _ = planted_split
    kw = dict(epochs=8, batch_size=64, lr=1e-2, patience=10, **SMALL)
    m1 = fit_scorer(TrainConfig(num_workers=1, **kw), train, items, tmp_path / "w1", valid_df=valid)
    m2 = fit_scorer(TrainConfig(num_workers=2, **kw), train, items, tmp_path / "w2", valid_df=valid)
    counts = np.bincount(attach_item_idx(train, items)["item_idx"], minlength=items.n_items).astype(
        np.float32
    )
    users = sorted(valid["user_id"].unique())
    ndcg_pop = _eval_ndcg(np.tile(counts, (len(users), 1)), train, valid, items)
    a, b = m1["metrics"]["val_ndcg@10"], m2["metrics"]["val_ndcg@10"]
    assert m2["config"]["num_workers"] == 2
    assert min(a, b) >= 1.5 * ndcg_pop, (a, b, ndcg_pop)
    assert abs(a - b) <= 0.4 * max(a, b), (a, b)


def _write_artifacts(tmp, items: ItemSpace, df: pd.DataFrame):
    """Hand-written `prepare` + `embed` artifacts (canonical parquet + meta.json) for the CLI test."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from llmrec.artifacts import write_meta

    data, emb = tmp / "data", tmp / "embeddings"
    data.mkdir()
    emb.mkdir()
    pq.write_table(
        pa.Table.from_pandas(df.astype({"ts": "int64", "rating": "float64"}), preserve_index=False),
        data / "interactions.parquet",
    )
    write_meta(data, "prepare")
    d = items.text_vectors.shape[1]
    col = pa.FixedSizeListArray.from_arrays(pa.array(items.text_vectors.ravel(), pa.float32()), d)
    pq.write_table(
        pa.table({"item_id": pa.array(items.item_ids.astype(str)), "embedding": col}),
        emb / "embeddings.parquet",
    )
    write_meta(emb, "embed", model_name="planted", dim=d, n_items=items.n_items, normalized=True)
    return data, emb


@pytest.mark.slow
def test_cli_train_and_resume(ray_local, planted_split, tmp_path):
    from llmrec.cli import main

    items, _, trainval, *_ = planted_split
    data, emb = _write_artifacts(tmp_path, items, trainval)
    out = tmp_path / "scorer"
    small = ["--dim", "16", "--max-len", "10", "--batch-size", "64", "--lr", "1e-2", "--patience", "10"]
    assert (
        main(
            ["train", "--data", str(data), "--embeddings", str(emb), "--out", str(out), "--epochs", "1"]
            + small
        )
        == 0
    )
    assert (
        main(
            [
                "train",
                "--data",
                str(data),
                "--embeddings",
                str(emb),
                "--out",
                str(out),
                "--epochs",
                "2",
                "--resume",
                str(out),
            ]
            + small
        )
        == 0
    )
    meta = json.loads((out / "meta.json").read_text())
    assert meta["epochs_run"] == [1] and meta["embed"]["model_name"] == "planted"
    assert Scorer.load(out).n_items == items.n_items
    # a model file of another network version (a parameter missing) is a clear ArtifactError, not a torch dump
    import torch

    from llmrec.artifacts import ArtifactError

    state = torch.load(out / "model.pt", weights_only=True)
    del state["model"]["log_scale"]
    torch.save(state, out / "model.pt")
    with pytest.raises(ArtifactError, match="different version of the scorer network.*re-run `llmrec train"):
        Scorer.load(out)
    # a wrong embeddings folder is one clear error line, exit code 2
    assert main(["train", "--data", str(data), "--embeddings", str(data), "--out", str(out)]) == 2


@pytest.mark.slow
def test_recommender_protocol_two_stage_block(ray_local, planted_split):
    from llmrec.scorer.recommender import LLMRecRecommender

    items, _, trainval, *_ = planted_split
    rec = LLMRecRecommender(
        n_candidates=20,
        epochs=2,
        batch_size=64,
        lr=1e-2,
        **{k: v for k, v in SMALL.items() if k != "n_candidates"},
    )
    rec.fit(attach_item_idx(trainval, items), items)
    hists = make_histories(attach_item_idx(trainval, items))[:8]
    S = rec.score(hists)
    assert S.shape == (8, items.n_items) and S.dtype == np.float32 and np.isfinite(S).all()
    idx, _ = rec.scorer.recommend(hists, k=20, n_candidates=20)
    for b in range(8):
        top = np.argsort(-S[b], kind="stable")[:20]
        # the re-ranked block (retrieval top-20 of unseen items) sits above everything, in MLP order
        np.testing.assert_array_equal(top, idx[b])


def test_split_last_event_caps_validation_users_and_drops_nothing(planted_split):
    _, _, trainval, *_ = planted_split
    n_users = trainval["user_id"].nunique()
    tr_all, va_all = split_last_event(trainval)
    assert len(va_all) == n_users and len(tr_all) + len(va_all) == len(trainval)
    tr, va = split_last_event(trainval, max_users=10, seed=3)
    assert len(va) == 10 and va["user_id"].is_unique and len(tr) + len(va) == len(trainval)
    last = trainval.sort_values("ts", kind="stable").groupby("user_id").tail(1).set_index("user_id")
    for row in va.itertuples():  # each held-out event is that user's last one
        assert (row.item_id, row.ts) == (last.loc[row.user_id, "item_id"], last.loc[row.user_id, "ts"])
    pd.testing.assert_frame_equal(split_last_event(trainval, 10, 3)[1], va)  # seeded: same users again
    assert set(split_last_event(trainval, 10, 4)[1]["user_id"]) != set(va["user_id"])
    assert len(split_last_event(trainval, 10_000)[1]) == n_users  # a cap above the users holds out all
    with pytest.raises(ValueError, match="max_users must be >= 0"):
        split_last_event(trainval, -1)


@pytest.mark.slow
def test_worker_killed_mid_training_resumes_from_the_last_checkpoint(ray_local, tmp_path):
    """FailureConfig: kill -9 the training worker once its first checkpoint is registered; Ray Train restarts
    the worker group from the latest checkpoint (checkpoint_dir, a shared folder here) and training ends with
    every epoch once."""
    import os
    import signal
    import threading
    import time

    import torch

    from llmrec.scorer.recommender import split_last_event

    items, df, _ = planted(n_users=900, events=12)
    train, valid = split_last_event(df)
    ckpt = tmp_path / "shared-checkpoints"
    out = {}

    def run() -> None:
        try:
            cfg = TrainConfig(epochs=6, batch_size=32, patience=10, max_failures=2, **SMALL)
            out["meta"] = fit_scorer(cfg, train, items, tmp_path / "scorer", valid_df=valid,
                                     checkpoint_dir=str(ckpt))
        except Exception as e:  # surfaced below
            out["error"] = e

    t = threading.Thread(target=run)
    t.start()
    killed = None
    deadline = time.time() + 600
    while t.is_alive() and killed is None and time.time() < deadline:
        files = sorted(ckpt.glob("*/checkpoint_*/checkpoint.pt"))
        if len(files) >= 2:  # the first is registered with the controller once the second is being written
            state = torch.load(files[0], map_location="cpu", weights_only=False)
            killed = (int(state["epoch"]), int(state["worker_pid"]))
            os.kill(killed[1], signal.SIGKILL)
        time.sleep(0.05)
    t.join(timeout=900)
    assert "error" not in out, out.get("error")
    assert killed is not None and killed[0] < 5, "the worker was not killed before the last epoch"
    meta = out["meta"]
    assert [h["epoch"] for h in meta["history"]] == list(range(6))  # every epoch exactly once
    assert meta["epochs_run"] and meta["epochs_run"][0] > 0  # the last attempt resumed after a checkpoint
