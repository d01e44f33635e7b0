"""End to end: evaluate() and the `llmrec evaluate` / `llmrec recommend` commands on a planted run folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmrec.artifacts import write_meta
from llmrec.cli import main as cli_main
from llmrec.eval.evaluate import evaluate
from llmrec.schema import EMBEDDINGS_FILE

N_CLUSTERS, PER_CLUSTER, N_COLD, DIM, N_USERS, SEQ = 3, 20, 6, 16, 120, 10
BASELINES = ["popularity", "itemknn", "als", "sasrec", "zeroshot_text"]
METRIC_KEYS = ["recall@10", "recall@20", "ndcg@10", "ndcg@20", "mrr", "coverage@10"]
TINY = {"sasrec": {"epochs": 3, "max_len": 12, "n_blocks": 1, "num_threads": 1}, "als": {"factors": 8}}
# one setting per model keeps the default suite fast; tests/test_tuning.py covers the grids themselves
ONE = {"itemknn": [{"n_neighbors": 20}], "als": [{}], "sasrec": [{}], "zeroshot_text": [{}]}
KEYS = ["dataset", "protocol", "n_users", "n_items", "models", "cold_items", "repeat_targets_removed", "ci95",
        "diff_vs_llmrec_ci95", "unique_ts", "seeds", "tuning"]


def make_run(root: Path, seed: int = 0) -> Path:
    """A run folder (data/ + embeddings/) with cluster-walk users; 6 items appear only as some users' last
    event, after everything else in time: cold items of the time protocol."""
    from llmrec.data.tables import write_interactions, write_items

    rng = np.random.default_rng(seed)
    n_warm = N_CLUSTERS * PER_CLUSTER
    cluster_of = np.r_[np.repeat(np.arange(N_CLUSTERS), PER_CLUSTER), np.arange(N_COLD) % N_CLUSTERS]
    centroids = rng.normal(size=(N_CLUSTERS, DIM))
    vecs = centroids[cluster_of] + 0.3 * rng.normal(size=(len(cluster_of), DIM))
    vecs = (vecs / np.linalg.norm(vecs, axis=1, keepdims=True)).astype(np.float32)
    ids = [f"item{j:03d}" for j in range(len(cluster_of))]
    items = pd.DataFrame(
        {
            "item_id": ids,
            "text": [f"topic {c} item {j}" for j, c in enumerate(cluster_of)],
            "title": [f"Item {j}" for j in range(len(ids))],
        }
    )
    rows = []
    for u in range(N_USERS):
        c, start = int(rng.integers(N_CLUSTERS)), int(rng.integers(PER_CLUSTER))
        for t in range(SEQ):
            rows.append((f"user{u:03d}", ids[c * PER_CLUSTER + (start + t) % PER_CLUSTER], 1000 * t + u))
        if u % 4 == 0:  # a last event on a new item of the user's cluster
            cold = [n_warm + j for j in range(N_COLD) if cluster_of[n_warm + j] == c]
            rows.append((f"user{u:03d}", ids[int(rng.choice(cold))], 1000 * SEQ + u))
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "ts"]).assign(rating=np.nan, event="view")
    run = root / "run"
    write_items(items, run / "data")
    write_interactions(inter, run / "data")
    write_meta(run / "data", "prepare", dataset="planted")
    emb = run / "embeddings"
    emb.mkdir(parents=True)
    arr = pa.FixedSizeListArray.from_arrays(pa.array(vecs.ravel(), pa.float32()), DIM)
    pq.write_table(pa.table({"item_id": pa.array(ids, pa.string()), "embedding": arr}), emb / EMBEDDINGS_FILE)
    write_meta(emb, "embed", model_name="planted-text", dim=DIM, n_items=len(ids), normalized=True)
    return run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("evalrun"))


@pytest.fixture(scope="module")
def results(run_dir: Path) -> dict:
    return evaluate(
        run_dir / "data",
        run_dir / "embeddings",
        run_dir / "eval",
        models=BASELINES,
        baseline_kwargs=TINY,
        grids=ONE,
        seed=0,
        time_cutoff_ts=1000 * SEQ - 1,
    )


def test_metrics_json_has_the_documented_layout(results: dict, run_dir: Path) -> None:
    on_disk = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert on_disk == results
    assert list(on_disk) == ["loo", "time"]
    for proto, res in on_disk.items():
        assert list(res) == KEYS
        assert res["dataset"] == "planted" and res["protocol"] == proto and res["n_items"] == 66
        assert set(res["ci95"]) == set(BASELINES) and res["diff_vs_llmrec_ci95"] == {}  # no llmrec here
        assert list(res["models"]) == BASELINES
        for m in res["models"].values():
            assert list(m) == METRIC_KEYS and all(0.0 <= v <= 1.0 for v in m.values())
        assert list(res["cold_items"]) == ["n_events", "models", "ci95", "diff_vs_llmrec_ci95"]
        assert json.loads((run_dir / "eval" / f"metrics_{proto}.json").read_text()) == res
    assert on_disk["loo"]["n_users"] == N_USERS
    meta = json.loads((run_dir / "eval" / "meta.json").read_text())
    assert meta["stage"] == "evaluate" and set(meta["per_protocol"]["loo"]["timings"]) == set(BASELINES)
    report = (run_dir / "eval" / "report.md").read_text()
    assert "## Protocol `loo`" in report and "| zeroshot_text |" in report and "Cold items" in report
    assert "95% bootstrap interval over the users with a cold target" in report
    assert (run_dir / "eval" / "metrics.png").read_bytes()[:4] == b"\x89PNG"


def test_per_user_ranks_and_intervals_match_the_metrics(results: dict, run_dir: Path) -> None:
    """per_user.parquet holds one row per (protocol, model, test user); its NDCG@10 averages to metrics.json's
    figure, 1 / rank to the MRR, and the 95% interval of each model brackets that mean."""
    import pandas as pd

    pu = pd.read_parquet(run_dir / "eval" / "per_user.parquet")
    assert list(pu.columns) == ["user_id", "protocol", "model", "rank", "ndcg@10", "seed"]
    for proto, res in results.items():
        for name, m in res["models"].items():
            rows = pu[(pu["protocol"] == proto) & (pu["model"] == name)]
            assert len(rows) == res["n_users"] and rows["user_id"].is_unique
            assert rows["ndcg@10"].mean() == pytest.approx(m["ndcg@10"], abs=1e-9)
            assert (1.0 / rows["rank"]).mean() == pytest.approx(m["mrr"], abs=1e-9)
            lo, hi = res["ci95"][name]
            assert lo <= m["ndcg@10"] <= hi


def test_cold_items_only_text_can_hit(results: dict) -> None:
    cold = results["time"]["cold_items"]
    assert cold["n_events"] == N_USERS // 4  # every 4th user's target is a new item
    for name in ("popularity", "itemknn", "als", "sasrec"):
        assert cold["models"][name]["recall@20"] == 0.0, name  # -inf: cannot recommend what it never saw
    assert cold["models"]["zeroshot_text"]["recall@20"] > 0.5  # text places them in the user's cluster
    warm = results["loo"]["models"]
    assert warm["itemknn"]["recall@10"] > 0.5 and warm["zeroshot_text"]["recall@10"] > 0.5
    # intervals over the users with a cold target: an ID model's NDCG is 0 for each of them, so its interval
    # is exactly [0, 0]; text's brackets its mean and is not a point (the users differ)
    assert set(cold["ci95"]) == set(cold["models"]) and cold["diff_vs_llmrec_ci95"] == {}  # no llmrec here
    for name in ("popularity", "itemknn", "als", "sasrec"):
        assert cold["ci95"][name] == [0.0, 0.0], name
    lo, hi = cold["ci95"]["zeroshot_text"]
    assert lo < cold["models"]["zeroshot_text"]["ndcg@10"] < hi


def test_max_test_users_is_a_seeded_sample(run_dir: Path, tmp_path: Path) -> None:
    a = evaluate(
        run_dir / "data",
        run_dir / "embeddings",
        tmp_path / "a",
        protocols=("loo",),
        models=["popularity"],
        max_test_users=30,
        seed=1,
    )
    b = evaluate(
        run_dir / "data",
        run_dir / "embeddings",
        tmp_path / "b",
        protocols=("loo",),
        models=["popularity"],
        max_test_users=30,
        seed=1,
    )
    assert a["loo"]["n_users"] == 30 and a == b


def test_bad_arguments(run_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown model"):
        evaluate(run_dir / "data", run_dir / "embeddings", tmp_path, models=["wals"])
    with pytest.raises(ValueError, match="protocols"):
        evaluate(run_dir / "data", run_dir / "embeddings", tmp_path, protocols=("random",))


def test_cli_evaluate_and_recommend(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "eval"
    rc = cli_main(
        [
            "evaluate",
            "--data",
            str(run_dir / "data"),
            "--run",
            str(run_dir),
            "--out",
            str(out),
            "--protocol",
            "loo",
            "--models",
            "popularity,zeroshot_text",
        ]
    )
    assert rc == 0 and list(json.loads((out / "metrics.json").read_text())["loo"]["models"]) == [
        "popularity",
        "zeroshot_text",
    ]
    users = tmp_path / "users.txt"
    users.write_text("user001\n\nuser000\nuser001\n")
    recs = tmp_path / "recs.parquet"
    rc = cli_main(
        [
            "recommend",
            "--run",
            str(run_dir),
            "--users",
            str(users),
            "--k",
            "5",
            "--out",
            str(recs),
            "--model",
            "popularity",
        ]
    )
    assert rc == 0
    df = pd.read_parquet(recs)
    assert list(df.columns) == ["user_id", "item_id", "rank", "score"]
    assert (
        df.user_id.tolist() == ["user001"] * 5 + ["user000"] * 5
        and df["rank"].tolist() == [1, 2, 3, 4, 5] * 2
    )
    inter = pd.read_parquet(run_dir / "data" / "interactions.parquet")
    for u, g in df.groupby("user_id"):
        seen = set(inter.loc[inter.user_id == u, "item_id"])
        assert not seen & set(g.item_id)  # history excluded
        # reference: the most frequent unseen items, in count order
        counts = inter[~inter.item_id.isin(seen)].item_id.value_counts()
        assert g.score.tolist() == sorted(g.score.tolist(), reverse=True)
        assert g.score.iloc[0] == counts.iloc[0] and set(g.score) <= set(counts.iloc[:5].astype(float))
    users.write_text("user000\nnobody\n")
    assert (
        cli_main(
            [
                "recommend",
                "--run",
                str(run_dir),
                "--users",
                str(users),
                "--out",
                str(recs),
                "--model",
                "popularity",
            ]
        )
        == 2
    )
    assert "nobody" in capsys.readouterr().err
    assert (
        cli_main(
            [
                "recommend",
                "--run",
                str(run_dir),
                "--users",
                str(users),
                "--out",
                str(recs),
                "--model",
                "popularity",
                "--skip-unknown",
            ]
        )
        == 0
    )
    assert set(pd.read_parquet(recs).user_id) == {"user000"}


def test_time_targets_all_counts_every_post_cutoff_item(run_dir: Path, tmp_path: Path) -> None:
    rc = cli_main(
        [
            "evaluate",
            "--data",
            str(run_dir / "data"),
            "--run",
            str(run_dir),
            "--out",
            str(tmp_path),
            "--protocol",
            "time",
            "--models",
            "popularity",
            "--time-cutoff",
            str(1000 * (SEQ - 1) - 1),
            "--time-targets",
            "all",
        ]
    )
    assert rc == 0
    res = json.loads((tmp_path / "metrics.json").read_text())["time"]
    meta = json.loads((tmp_path / "meta.json").read_text())["per_protocol"]["time"]["split"]
    # after the cutoff: every user's step SEQ-1 event, plus the cold last event of every 4th user
    assert res["n_users"] == N_USERS and meta["n_test"] == N_USERS + N_USERS // 4
    assert res["cold_items"]["n_events"] == N_USERS // 4


class _HistoryFirst:
    """Scores each user's history items 1.0 and every other item by a fixed preference (item 5 best)."""

    name = "history_first"

    def fit(self, train: pd.DataFrame, items) -> None:  # noqa: ANN001
        self.n = items.n_items

    def score(self, histories: list) -> np.ndarray:
        s = np.tile(np.linspace(0.0, 0.5, self.n, dtype=np.float32), (len(histories), 1))  # item 5 highest
        for b, h in enumerate(histories):
            s[b, h.item_idx] = 1.0
        return s


def test_repeat_targets_are_removed_and_counted() -> None:
    """A test target the user already has in their history is excluded from ranking for every model, so it is
    removed (and counted) rather than credited to models that score history items high."""
    from llmrec.data.histories import attach_item_idx
    from llmrec.eval.evaluate import evaluate_models
    from llmrec.eval.split import leave_last_out
    from llmrec.protocol import ItemSpace

    rows = [("a", 0), ("a", 1), ("a", 2), ("a", 1),  # a's test target (item 1) is a repeat
            ("b", 3), ("b", 4), ("b", 5)]  # b's test target (item 5) is new
    inter = pd.DataFrame({"user_id": [u for u, _ in rows], "item_id": [str(i) for _, i in rows],
                          "ts": np.arange(len(rows)), "rating": np.nan, "event": "click"})
    space = ItemSpace(item_ids=np.array([str(i) for i in range(6)], dtype=object),
                      text_vectors=np.eye(6, dtype=np.float32))
    inter = attach_item_idx(inter, space)
    res, _, n_users = evaluate_models(leave_last_out(inter), space, [_HistoryFirst()])
    assert res["repeat_targets_removed"] == 1
    assert n_users == 1  # only b is left
    # b: history {3, 4} excluded, item 5 is ranked first among the rest -> every metric is 1
    m = res["models"]["history_first"]
    assert m["ndcg@10"] == pytest.approx(1.0) and m["recall@10"] == pytest.approx(1.0)


def test_cold_protocol_only_text_models_reach_held_out_items(run_dir: Path, tmp_path: Path) -> None:
    """`--protocol cold`: 10% of the items are held out with all their events, so every target is an item the
    models never saw in training; ID models cannot rank them (they score exactly 0), text can."""
    import argparse

    from llmrec.commands import evaluate as cmd

    p = argparse.ArgumentParser()
    cmd.add_arguments(p)
    assert cmd.resolve_preset(p.parse_args(["--data", "d", "--run", "r", "--out", "o"]))[0] == ["loo", "time"]
    rc = cli_main(
        ["evaluate", "--data", str(run_dir / "data"), "--run", str(run_dir), "--out", str(tmp_path),
         "--protocol", "cold", "--models", "popularity,itemknn,zeroshot_text"]
    )
    assert rc == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert list(metrics) == ["cold"]
    res = metrics["cold"]
    assert list(res) == KEYS
    assert res["protocol"] == "cold" and res["n_items"] == 66 and res["repeat_targets_removed"] == 0
    for name in ("popularity", "itemknn"):
        assert res["models"][name]["ndcg@10"] == 0.0 and res["models"][name]["recall@20"] == 0.0, name
    assert res["models"]["zeroshot_text"]["ndcg@10"] > 0.1
    # every target is cold: the cold-item block is the main block
    assert res["cold_items"]["models"] == res["models"]
    # reference: the targets the split documents, rebuilt from the interactions and the held-out items
    split = json.loads((tmp_path / "meta.json").read_text())["per_protocol"]["cold"]["split"]
    inter = pd.read_parquet(run_dir / "data" / "interactions.parquet")
    n_items = inter.item_id.nunique()
    assert split["n_heldout_items"] == round(0.1 * n_items) == 7
    from llmrec.eval.split import cold_item_split

    held = set(cold_item_split(inter, frac=0.1, seed=0).cold_items)
    on_held = inter.item_id.isin(held)
    train_users = set(inter.loc[~on_held, "user_id"])
    pairs = inter.loc[on_held & inter.user_id.isin(train_users), ["user_id", "item_id"]].drop_duplicates()
    assert res["cold_items"]["n_events"] == split["n_test"] == len(pairs)
    assert res["n_users"] == split["n_test_users"] == pairs.user_id.nunique()
    report = (tmp_path / "report.md").read_text()
    assert (
        "## Protocol `cold`" in report and "Held-out items: a random share" in report
        and "| zeroshot_text |" in report
    )
    with pytest.raises(ValueError, match="protocols must be a non-empty subset of"):
        evaluate(run_dir / "data", run_dir / "embeddings", tmp_path, protocols=("cold", "warm"))


def test_cold_protocol_makes_llmrec_cold_choice_on_items_held_out_of_its_training(
    run_dir: Path, tmp_path: Path, ray_local
) -> None:
    """Under `--protocol cold` llmrec's cold-item fields are chosen on items held out of the *training* split
    (llmrec.eval.cold_choice): the inner split is `cold_item_split` of the train frame (the reference below,
    rebuilt from the interactions), every validation target is one of its never-trained items, and the pick
    covers every cold-item field."""
    from llmrec.eval.split import cold_item_split
    from llmrec.scorer.finalize import COLD_BONUS_GRID, COLD_CHOICES, COLD_KEEP_GRID

    tiny = {"epochs": 2, "num_workers": 0, "dim": 16, "max_len": 8, "batch_size": 64, "val_users": 40}
    res = evaluate(run_dir / "data", run_dir / "embeddings", tmp_path, protocols=("cold",),
                   models=["llmrec", "zeroshot_text"], llmrec_kwargs=tiny, seed=0)["cold"]
    choice = res["tuning"]["llmrec"]["cold_choice"]
    inter = pd.read_parquet(run_dir / "data" / "interactions.parquet")
    train = cold_item_split(inter, frac=0.1, seed=0).train
    inner = cold_item_split(train, frac=0.1, seed=0)
    assert choice["held_out"] == json.loads(json.dumps(inner.stats))
    assert choice["held_out"]["n_heldout_items"] == round(0.1 * train.item_id.nunique()) == 6
    n_val = inner.test.user_id.nunique()  # every inner test user has other training events (the split's rule)
    assert choice["measured"] and choice["n_validation_users"] == choice["n_cold_targets"] == n_val > 30
    assert choice["n_pseudo_cold_items"] == 0 and choice["val_ndcg_warm_targets"] is None
    assert list(choice["pick"]) == list(COLD_CHOICES)
    # the evaluated scorer was fitted with the held-out pick in place of a made-cold choice
    assert res["tuning"]["llmrec"]["cold_served"] == choice["pick"]
    assert res["tuning"]["llmrec"]["cold_method"] == "held-out-new"
    assert choice["pick"]["cold_bonus"] in COLD_BONUS_GRID and choice["pick"]["cold_keep"] in COLD_KEEP_GRID
    # the pick is the best validation NDCG of its grid (every target cold: ties go to the larger bonus)
    best = max(max(v) for v in choice["val_ndcg_by_keep"].values())
    assert max(choice["val_ndcg"]) == pytest.approx(best)
    assert res["models"]["llmrec"]["ndcg@10"] > 0


def test_train_cold_choice_held_out_serves_the_held_out_pick_and_evaluate_scores_it(
    run_dir: Path, tmp_path: Path, ray_local
) -> None:
    """`llmrec train --holdout loo --cold-choice held-out-new`: the scorer's cold-item fields are the pick
    that `held_out_cold_choice` makes on the very training split (called here directly: the reference),
    model.pt ranks with them, and `llmrec evaluate` reusing that scorer scores it with that pick, choosing
    nothing again (what is evaluated is what is served)."""
    import dataclasses
    import shutil

    from llmrec.commands.train import loo_holdout
    from llmrec.config import TrainConfig
    from llmrec.data.tables import read_interactions, read_items
    from llmrec.embed.artifact import load_item_space
    from llmrec.eval.cold_choice import held_out_cold_choice
    from llmrec.scorer.finalize import COLD_CHOICES
    from llmrec.scorer.inference import Scorer

    run = tmp_path / "run"
    for sub in ("data", "embeddings"):
        shutil.copytree(run_dir / sub, run / sub)
    flags = ["--epochs", "2", "--num-workers", "0", "--dim", "16", "--max-len", "8", "--batch-size", "64",
             "--val-users", "40"]
    argv = ["train", "--data", str(run / "data"), "--embeddings", str(run / "embeddings"),
            "--out", str(run / "scorer"), "--holdout", "loo", "--cold-choice", "held-out-new", *flags]
    assert cli_main(argv) == 0
    meta = json.loads((run / "scorer" / "meta.json").read_text())
    assert meta["config"]["cold_choice"] == meta["cold_bonus"]["method"] == "held-out-new"
    served = {k: meta["model_config"][k] for k in COLD_CHOICES}
    assert {k: getattr(Scorer.load(run / "scorer").model.cfg, k) for k in COLD_CHOICES} == served

    items, embed_meta = load_item_space(run / "embeddings", read_items(run / "data"))
    train, _, space, _ = loo_holdout(read_interactions(run / "data"), items, str(run / "data"), embed_meta,
                                     40, 0)
    kwargs = {f.name: meta["config"][f.name] for f in dataclasses.fields(TrainConfig)}
    pick, summary = held_out_cold_choice(train, space, kwargs, seed=0)
    assert served == pick
    cb = meta["cold_bonus"]
    assert cb["held_out"] == json.loads(json.dumps(summary["held_out"])) and cb["measured"]
    # every validation user's target is one of the items held out of the inner training
    assert cb["n_pseudo_cold_items"] == 0 and cb["n_cold_targets"] == cb["n_validation_users"] > 30

    res = evaluate(run / "data", run / "embeddings", tmp_path / "eval", protocols=("loo",), models=["llmrec"],
                   seed=0, reuse_scorer=True, llmrec_kwargs={"val_users": 40})["loo"]
    t = res["tuning"]["llmrec"]
    assert t["reused_run_scorer"] is True and t["cold_method"] == "held-out-new"
    assert t["cold_served"] == t["cold_choice"]["pick"] == pick
    # the artifact's own choice, not made again
    assert t["cold_choice"]["seconds"] == meta["cold_bonus"]["seconds"]
