"""Replay on a small planted dataset: users switch topic after the cutoff, so online updates must win."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmrec import schema
from llmrec.artifacts import write_meta
from llmrec.data.tables import write_interactions, write_items
from llmrec.eval.replay import cutoff_split, replay
from llmrec.index.item_index import ItemIndex


def make_run(
    run: Path,
    ids: list[str],
    vectors: np.ndarray,
    titles: list[str],
    model_name: str,
    model_path: str | None = None,
    interactions: pd.DataFrame | None = None,
) -> Path:
    """A run folder for serving: data/items(+interactions), embeddings/ (artifact), index/ (flat)."""
    vectors = np.asarray(vectors, np.float32)
    items = pd.DataFrame({schema.ITEM_ID: ids, schema.TEXT: titles, "title": titles})
    write_items(items, _mk(run / schema.RUN_DATA))
    if interactions is not None:
        write_interactions(interactions, run / schema.RUN_DATA)
    emb_dir = _mk(run / schema.RUN_EMBEDDINGS)
    n, d = vectors.shape
    col = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), d)
    pq.write_table(
        pa.table({schema.ITEM_ID: pa.array(ids, pa.string()), schema.EMBEDDING: col}),
        emb_dir / schema.EMBEDDINGS_FILE,
    )
    meta = write_meta(
        emb_dir,
        "embed",
        model_name=model_name,
        model_path=model_path,
        dim=d,
        normalized=True,
        max_length=128,
        pooling="mean",
        n_items=n,
    )
    ItemIndex.build(vectors, ids, kind="flat", device="cpu", embed_meta=meta).save(
        run / schema.RUN_INDEX, meta
    )
    return run


def _mk(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def planted(tmp_path: Path, n_topics: int = 4, per_topic: int = 10, n_users: int = 24, seed: int = 0):
    """Topic clusters on orthogonal axes; a user likes 4 items of topic a before the cutoff, 5 of b after."""
    rng = np.random.default_rng(seed)
    d = 16
    vecs, ids = [], []
    for t in range(n_topics):
        for j in range(per_topic):
            v = np.zeros(d)
            v[t] = 1.0
            v[n_topics:] = rng.normal(0, 0.15, d - n_topics)
            vecs.append(v / np.linalg.norm(v))
            ids.append(f"t{t}-{j}")
    rows = []
    for u in range(n_users):
        a, b = u % n_topics, (u + 1) % n_topics
        for j, it in enumerate(rng.choice(per_topic, 4, replace=False)):
            rows.append((f"u{u}", f"t{a}-{it}", 10 * j + u % 7, 5.0))
        for j, it in enumerate(rng.choice(per_topic, 5, replace=False)):
            rows.append((f"u{u}", f"t{b}-{it}", 1000 + 37 * j + u, 5.0))
    inter = pd.DataFrame(rows, columns=[schema.USER_ID, schema.ITEM_ID, schema.TS, schema.RATING])
    inter[schema.TS] = inter[schema.TS].astype("int64")
    inter[schema.EVENT] = "rating"
    run = make_run(
        tmp_path / "run", ids, np.stack(vecs), [f"Title {i}" for i in ids], "planted-16d", interactions=inter
    )
    return run, inter


def test_cutoff_split_orders_by_time(tmp_path: Path) -> None:
    _, inter = planted(tmp_path)
    hist, stream, cutoff = cutoff_split(inter, test_frac=0.56)
    assert len(hist) + len(stream) == len(inter)
    assert hist[schema.TS].max() <= cutoff < stream[schema.TS].min()
    assert stream[schema.TS].is_monotonic_increasing
    with pytest.raises(ValueError, match="test_frac"):
        cutoff_split(inter, test_frac=1.5)


def test_online_updates_beat_frozen_state(tmp_path: Path) -> None:
    run, inter = planted(tmp_path)
    out = replay(run, run / schema.RUN_DATA, test_frac=0.56, max_events=None, out_dir=tmp_path / "eval")
    # every post-cutoff event is a (new-item) target: 24 users x 5 events
    assert out["n_stream_events"] == 120 and out["n_targets"] == 120 and out["n_users"] == 24
    on, fr = out["online"], out["frozen"]
    # frozen state points at topic a; only chance puts topic-b items in its top-10 (6 a items left + 4 others)
    assert on["recall@10"] >= fr["recall@10"] + 0.3, out
    assert on["ndcg@10"] > fr["ndcg@10"]
    assert out["gain"]["recall@10"] == pytest.approx(on["recall@10"] - fr["recall@10"])
    # frozen top-10 = 6 unseen topic-a items + 4 of the 30 others, so a topic-b hit is rare
    assert fr["recall@10"] <= 0.2
    written = json.loads((tmp_path / "eval" / "replay.json").read_text())
    assert written["online"] == on and written["mode"] == "in-process"


def test_max_events_limits_the_stream(tmp_path: Path) -> None:
    run, _ = planted(tmp_path)
    out = replay(run, run / schema.RUN_DATA, test_frac=0.56, max_events=10, out_dir=tmp_path / "e2")
    assert out["n_stream_events"] == 10 and out["n_stream_events_available"] == 120
    with pytest.raises(ValueError, match="max_events"):
        replay(run, run / schema.RUN_DATA, max_events=0, out_dir=tmp_path / "e3")


def test_replay_command(tmp_path: Path) -> None:
    from llmrec.cli import main

    run, _ = planted(tmp_path)
    rc = main(
        [
            "replay",
            "--run",
            str(run),
            "--data",
            str(run / schema.RUN_DATA),
            "--test-frac",
            "0.56",
            "--max-events",
            "0",
            "--out",
            str(tmp_path / "cli"),
        ]
    )
    assert rc == 0
    out = json.loads((tmp_path / "cli" / "replay.json").read_text())
    assert out["n_stream_events"] == 120 and out["online"]["recall@10"] > out["frozen"]["recall@10"]
    assert (
        main(["replay", "--run", str(run), "--data", str(run / schema.RUN_DATA), "--max-events", "-1"]) == 2
    )


def test_replay_learning_flags_are_checked_before_any_work(tmp_path: Path, capsys) -> None:
    from llmrec.cli import main

    run, _ = planted(tmp_path)
    base = ["replay", "--run", str(run), "--data", str(run / schema.RUN_DATA), "--out", str(tmp_path / "o")]
    for flag, value in (("--learn-num-workers", "-1"), ("--learn-every", "-5"), ("--learn-epochs", "0")):
        assert main([*base, "--learn-every", "10", flag, value]) == 2
        err = capsys.readouterr().err
        assert "--learn-every and --learn-num-workers must be >= 0" in err and f"{value}" in err, err
    assert not (tmp_path / "o").exists()


def _hand_scorer(run: Path, ids: list[str], vectors: np.ndarray, data_ts_max: int) -> None:
    """A scorer artifact written by hand (warm-started net over the run's catalog): what `llmrec train`
    writes."""
    import torch

    from llmrec.scorer.model import ScorerConfig, ScorerModel

    n, d = vectors.shape
    cfg = ScorerConfig(text_dim=d, n_items=n, n_id_slots=1, dim=8, max_len=10, rerank=False)
    m = ScorerModel(cfg, torch.from_numpy(vectors.astype(np.float32)), torch.zeros(n, dtype=torch.long))
    m.warm_start()
    out = _mk(run / schema.RUN_SCORER)
    torch.save({"model_config": cfg.to_dict(), "model": m.state_dict()}, out / "model.pt")
    np.save(out / "item_ids.npy", np.asarray(ids).astype(str))
    write_meta(out, "train", model_config=cfg.to_dict(), data_ts_max=data_ts_max)


def test_replay_refuses_a_scorer_trained_on_the_replayed_events(tmp_path: Path) -> None:
    run, inter = planted(tmp_path)
    emb = pq.read_table(run / schema.RUN_EMBEDDINGS / schema.EMBEDDINGS_FILE)
    ids = emb.column(schema.ITEM_ID).to_pylist()
    vecs = np.array(emb.column(schema.EMBEDDING).to_pylist(), np.float32)
    _, _, cutoff = cutoff_split(inter, 0.56)
    _hand_scorer(run, ids, vecs, data_ts_max=int(inter[schema.TS].max()))  # saw every event
    out = replay(run, run / schema.RUN_DATA, test_frac=0.56, max_events=20, out_dir=tmp_path / "e1")
    assert out["scorer"] is False and "after the replay cutoff" in out["scorer_choice"]
    _hand_scorer(run, ids, vecs, data_ts_max=cutoff)  # trained on pre-cutoff events only: used
    out = replay(run, run / schema.RUN_DATA, test_frac=0.56, max_events=20, out_dir=tmp_path / "e2")
    assert out["scorer"] is True and out["n_targets"] == 20


def test_one_table_of_positive_feedback() -> None:
    """schema.is_positive is the one definition (replay's positive targets, serving's co-occurrence
    history)."""
    cases = {("like", None): True, ("purchase", None): True, ("click", None): True, ("view", None): False,
             ("dislike", None): False, ("skip", None): False, ("rating", 4.0): True, ("rating", 5.0): True,
             ("rating", 3.5): False, ("rating", None): False}
    assert {c: schema.is_positive(*c) for c in cases} == cases
    assert (
        set(schema.POSITIVE_KINDS) | set(schema.NEGATIVE_KINDS) | {"view", "rating"}
        == set(schema.EVENT_KINDS)
    )
