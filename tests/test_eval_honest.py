"""Evaluation a skeptical reviewer can check, end to end on a tiny planted dataset (default suite):

- the llmrec row (and llmrec_neural) goes through `evaluate` with every tuned baseline and both hybrids;
- where co-occurrence carries the whole signal (text vectors are random), llmrec's co-occurrence weight chosen
  on validation is nonzero and it beats its neural part;
- no model's fit sees a test event: sentinel items that occur only in test rows are never scored above chance,
  i.e. above decoys (items that occur nowhere, with the same kind of text); a control model that does read the
  test rows scores them above every decoy, so the check has teeth;
- two runs with one seed give identical metrics (`evaluate`, and the same models built and evaluated by hand
  with `build_models` + `evaluate_models`, llmrec's from the `llmrec train --holdout loo` scorer, whose
  fitted models the leakage check then scores);
- `llmrec train --holdout loo` trains exactly the model `evaluate(reuse_scorer=True)` scores, with the same
  metrics as training it inside the evaluation.
"""

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
from llmrec.eval.evaluate import ALL_MODELS, evaluate
from llmrec.schema import EMBEDDINGS_FILE

N_GROUPS, PER_GROUP, SEQ, N_USERS, DIM, N_SENTINELS = 8, 8, 7, 150, 16, 24
# small grids and tiny models keep this module near a minute of CPU (the full grids: tests/test_tuning.py)
GRIDS = {
    "itemknn": [{"n_neighbors": 10}, {"n_neighbors": 30, "shrink": 10.0}],
    "als": [{"factors": 8}],
    "bpr": [{"factors": 8, "iterations": 30}],
    "ease": [{"l2": 1.0}, {"l2": 50.0}],
    "sasrec": [{}],
    "zeroshot_text": [{}],
}
BASELINE_KWARGS = {
    "sasrec": {"epochs": 4, "dim": 16, "n_blocks": 1, "max_len": 8, "num_threads": 1, "patience": 2}
}
# only settings `llmrec train` has flags for, so the CLI run below trains the same model
# num_workers 0: trained in this process (Ray Train local mode); Ray Train workers are tested in test_train
LLMREC = {"epochs": 2, "num_workers": 0, "dim": 16, "max_len": 8, "n_neg": -1, "batch_size": 64}
TRAIN_FLAGS = [
    "--epochs",
    "2",
    "--num-workers",
    "0",
    "--dim",
    "16",
    "--max-len",
    "8",
    "--n-neg",
    "-1",
    "--batch-size",
    "64",
]


def make_group_run(root: Path) -> tuple[Path, pd.DataFrame]:
    """Users buy 7 of the 8 items of one group in random order (co-occurrence = the whole signal); item text
    vectors are random (text knows nothing). Every third user's last event is one of 24 sentinel items that
    occur in no other row (only a model that reads test rows can know them); 24 decoys occur nowhere."""
    rng = np.random.default_rng(0)
    sentinels = [f"s{k}" for k in range(N_SENTINELS)]
    decoys = [f"d{k}" for k in range(N_SENTINELS)]
    ids = [f"g{g}i{j}" for g in range(N_GROUPS) for j in range(PER_GROUP)] + sentinels + decoys
    vecs = rng.normal(size=(len(ids), DIM))
    vecs = (vecs / np.linalg.norm(vecs, axis=1, keepdims=True)).astype(np.float32)
    rows = []
    for u in range(N_USERS):
        g = int(rng.integers(N_GROUPS))
        for t, j in enumerate(rng.permutation(PER_GROUP)[:SEQ]):
            rows.append((f"u{u:03d}", f"g{g}i{j}", 100 * u + t))
        if u % 3 == 0:
            rows.append((f"u{u:03d}", sentinels[(u // 3) % N_SENTINELS], 100 * u + SEQ))
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "ts"]).assign(rating=np.nan, event="purchase")
    items = pd.DataFrame({"item_id": ids, "text": [f"item {i}" for i in ids]})
    from llmrec.data.tables import write_interactions, write_items

    run = root / "run"
    write_items(items, run / "data")
    write_interactions(inter, run / "data")
    write_meta(run / "data", "prepare", dataset="groups", ts_is_order=False)
    emb = run / "embeddings"
    emb.mkdir(parents=True)
    arr = pa.FixedSizeListArray.from_arrays(pa.array(vecs.ravel(), pa.float32()), DIM)
    pq.write_table(pa.table({"item_id": pa.array(ids, pa.string()), "embedding": arr}), emb / EMBEDDINGS_FILE)
    write_meta(emb, "embed", model_name="random-text", dim=DIM, n_items=len(ids), normalized=True)
    return run, inter


class LeakyPopularity:
    """A control that cheats: it counts every interaction, test rows included (what the check must catch)."""

    name = "leaky_popularity"

    def __init__(self, everything: pd.DataFrame) -> None:
        self.everything = everything

    def fit(self, train: pd.DataFrame, items) -> None:  # noqa: ANN001
        counts = self.everything["item_id"].value_counts()
        self.scores = counts.reindex(items.item_ids).fillna(0.0).to_numpy(np.float32)

    def score(self, histories: list) -> np.ndarray:
        return np.tile(self.scores, (len(histories), 1))


@pytest.fixture(scope="module")
def honest(tmp_path_factory: pytest.TempPathFactory, ray_local) -> dict:
    """One `evaluate` run, and the same evaluation by hand (build_models + evaluate_models), fits kept."""
    from llmrec.data.histories import attach_item_idx
    from llmrec.embed.artifact import load_item_space
    from llmrec.eval.evaluate import evaluate_models, read_tables
    from llmrec.eval.models import ModelSetup, build_models
    from llmrec.eval.split import leave_last_out
    from llmrec.eval.tuning import InnerValidation

    root = tmp_path_factory.mktemp("honest")
    run, inter = make_group_run(root)
    first = evaluate(
        run / "data",
        run / "embeddings",
        root / "eval",
        protocols=("loo",),
        models=list(ALL_MODELS),
        grids=GRIDS,
        baseline_kwargs=BASELINE_KWARGS,
        llmrec_kwargs=LLMREC,
        extra_models=[LeakyPopularity(inter)],
        seed=0,
    )["loo"]
    # `llmrec train --holdout loo`: the run's scorer, trained on the split evaluate holds out
    argv = ["train", "--data", str(run / "data"), "--embeddings", str(run / "embeddings"),
            "--out", str(run / "scorer"), "--holdout", "loo", *TRAIN_FLAGS]
    assert cli_main(argv) == 0
    items, table = read_tables(run / "data")
    space, _ = load_item_space(run / "embeddings", items)
    split = leave_last_out(attach_item_idx(table, space, unknown="drop"), seed=0)
    val = InnerValidation.build(split.train, space.n_items, 1000, 0, valid=split.valid)
    # by hand, every baseline fitted again; llmrec is the CLI-trained scorer (the same split and seed as the
    # model `evaluate` trained above), so identical metrics also say the two trainings gave one model
    setup = ModelSetup(
        seed=0,
        validation=val,
        space=space,
        scorer_dir=run / "scorer",
        grids=GRIDS,
        baseline_kwargs=BASELINE_KWARGS,
        llmrec_kwargs=LLMREC,
        reuse_scorer=True,
    )
    models = [*build_models(list(ALL_MODELS), setup), LeakyPopularity(inter)]
    by_hand, _, _ = evaluate_models(split, space, models, seed=0)
    return {
        "run": run,
        "inter": inter,
        "first": first,
        "by_hand": by_hand,
        "models": models,
        "split": split,
        "space": space,
    }


def test_llmrec_row_goes_through_evaluation_with_every_tuned_baseline(honest: dict) -> None:
    res = honest["first"]
    names = list(res["models"])
    assert names[:2] == ["llmrec", "llmrec_neural"]
    assert set(names) == {"llmrec", "llmrec_neural", *ALL_MODELS[1:], "leaky_popularity"}
    m = {k: v["ndcg@10"] for k, v in res["models"].items()}
    assert m["llmrec"] > 2 * m["popularity"]  # the group structure is learnable; popularity ignores it
    t = res["tuning"]
    assert t["llmrec"]["best_epoch"] is not None and t["llmrec"]["reused_run_scorer"] is False
    assert t["itemknn"]["n_configs"] == 2 and t["itemknn"]["best"] in GRIDS["itemknn"]
    assert t["hybrid_id_itemknn"]["base"] in ("als", "bpr", "ease", "sasrec")
    assert set(res["diff_vs_llmrec_ci95"]) == set(names) - {"llmrec"}


def test_cooc_weight_is_nonzero_where_cooccurrence_carries_the_signal(honest: dict) -> None:
    res = honest["first"]
    assert res["tuning"]["llmrec"]["cooc_weight"] > 0
    assert res["models"]["llmrec"]["ndcg@10"] > res["models"]["llmrec_neural"]["ndcg@10"]
    # item-kNN sees exactly that signal; text alone sees nothing (random vectors)
    assert res["models"]["itemknn"]["ndcg@10"] > 3 * res["models"]["zeroshot_text"]["ndcg@10"]


def test_no_model_sees_a_test_event(honest: dict) -> None:
    """Each sentinel is the test target of two or three users and occurs nowhere else; for the users it is the
    target of, every fitted model scores it against the 24 decoys. Without leakage sentinel and decoys are
    exchangeable: the share of decoys scored below the sentinel (ties half) averages about 0.5."""
    from llmrec.data.histories import make_histories

    split, space, inter = honest["split"], honest["space"], honest["inter"]
    target = inter[inter.item_id.str.startswith("s")].set_index("user_id")["item_id"]
    users = np.array(sorted(target.index), dtype=object)
    hist = make_histories(split.history, users, split.seed)
    pos = {i: k for k, i in enumerate(space.item_ids)}
    s_idx = np.array([pos[target[u]] for u in users])
    d_idx = np.array([pos[f"d{k}"] for k in range(N_SENTINELS)])
    auc = {}
    for model in honest["models"]:
        sc = np.asarray(model.score(hist), dtype=np.float64)  # (U, N)
        s = sc[np.arange(len(users)), s_idx][:, None]  # (U, 1)
        d = sc[:, d_idx]  # (U, 24)
        auc[model.name] = float(((d < s) + 0.5 * (d == s)).mean())
    assert len(auc) == len(ALL_MODELS) + 2
    assert auc.pop("leaky_popularity") > 0.95, (
        "the control must find the sentinels, else the check is toothless"
    )
    assert all(v < 0.7 for v in auc.values()), auc


def test_two_runs_with_one_seed_give_identical_metrics(honest: dict) -> None:
    """Every baseline fitted twice, and llmrec trained twice (inside `evaluate`, and by `llmrec train
    --holdout loo`, which the by-hand run loads): identical metrics."""
    assert [m.pretrained for m in honest["models"] if m.name == "llmrec"] == [True]
    assert honest["by_hand"]["models"] == honest["first"]["models"]
    assert honest["by_hand"]["unique_ts"] == honest["first"]["unique_ts"]


def test_cold_target_intervals_are_the_paired_bootstrap_over_users_with_a_cold_target(honest: dict) -> None:
    """The sentinels are cold (only ever a test target): metrics.json's cold-item intervals are the bootstrap
    over exactly the users with a cold target, the paired one against llmrec's per-user NDCG@10."""
    from llmrec.metrics import bootstrap_ci

    cold, per = honest["first"]["cold_items"], honest["by_hand"]["cold_items"]["per_user"]
    assert 2 * N_SENTINELS <= cold["n_events"] <= 3 * N_SENTINELS  # each sentinel: 2-3 users' target
    ref = per["llmrec"]["ndcg@10"]
    assert len(ref) == cold["n_events"]  # one cold target per such user
    assert ref.mean() == pytest.approx(cold["models"]["llmrec"]["ndcg@10"], abs=1e-12)
    assert set(cold["diff_vs_llmrec_ci95"]) == set(cold["models"]) - {"llmrec"}
    for name, v in per.items():
        assert cold["ci95"][name] == list(bootstrap_ci(v["ndcg@10"], seed=0)), name
        if name != "llmrec":
            assert cold["diff_vs_llmrec_ci95"][name] == list(bootstrap_ci(v["ndcg@10"], ref, seed=0)), name


def test_holdout_trained_scorer_is_what_evaluation_scores(honest: dict, tmp_path: Path) -> None:
    """`llmrec train --holdout loo` then `evaluate(reuse_scorer=True)`: llmrec is not trained again, and its
    metrics equal those of the model trained inside the evaluation on the same split (same seed)."""
    run = honest["run"]  # the fixture ran `llmrec train --holdout loo` into RUN/scorer
    hold = json.loads((run / "scorer" / "meta.json").read_text())["holdout"]
    assert hold["protocol"] == "loo" and hold["n_test_held_out"] == N_USERS
    res = evaluate(
        run / "data",
        run / "embeddings",
        tmp_path,
        protocols=("loo",),
        models=["llmrec"],
        seed=0,
        reuse_scorer=True,
    )["loo"]
    assert res["tuning"]["llmrec"]["reused_run_scorer"] is True
    assert res["models"]["llmrec"] == honest["first"]["models"]["llmrec"]  # the same model, not retrained
    assert res["models"]["llmrec_neural"] == honest["first"]["models"]["llmrec_neural"]
