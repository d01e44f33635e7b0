"""Training data on Ray Data (llmrec.scorer.dataset) equals the in-process construction, event for event."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from test_scorer import planted

from llmrec.data.histories import attach_item_idx
from llmrec.data.order import sort_events
from llmrec.schema import ITEM_ID, USER_ID
from llmrec.scorer import data as sdata
from llmrec.scorer.dataset import cooc_matrices, training_data, user_hash
from llmrec.scorer.finalize import cooc_matrix


def _rows(samples: dict) -> list[tuple]:
    """Samples as a sorted list of hashable rows (the Ray path's row order is not the driver's)."""
    out = []
    for i in range(len(samples["target"])):
        n = int(samples["hist_len"][i])
        out.append((int(samples["target"][i]), n, tuple(np.asarray(samples["hist_idx"][i])[:n].tolist()),
                    tuple(np.asarray(samples["hist_event"][i])[:n].tolist())))
    return sorted(out)


@pytest.fixture(scope="module")
def planted_frame():
    items, df, _ = planted()
    rng = np.random.default_rng(1)
    return items, df.iloc[rng.permutation(len(df))].reset_index(drop=True)  # input order must not matter


def test_samples_counts_and_validation_match_the_driver_construction(ray_local, planted_frame, tmp_path):
    """From a shuffled frame and from a parquet file alike: the samples equal build_samples on the training
    events, the validation users are exactly the `val_users` eligible users with the smallest seeded hashes
    (their last event held out), item / target counts and both co-occurrence matrices equal brute force."""
    items, df = planted_frame
    path = tmp_path / "inter.parquet"
    df.to_parquet(path)
    for source in (df, str(path)):
        data = training_data(source, items, max_len=10, val_users=12, seed=3, n_blocks=3)
        # reference: the validation users by hash, their last event out, everything else in
        d = sort_events(attach_item_idx(df, items))
        users = np.array(sorted(d[USER_ID].unique()))
        chosen = set(users[np.argsort(user_hash(users, 3), kind="stable")[:12]])
        last = ~d[USER_ID].duplicated(keep="last").to_numpy()
        to_val = last & d[USER_ID].isin(chosen).to_numpy()
        train, valid = d[~to_val], d[to_val]
        ref = sdata.build_samples(train, items, max_len=10)
        got = {k: np.stack(data.samples.to_pandas()[k].to_numpy())
               if k.startswith("hist_") and k != "hist_len"
               else data.samples.to_pandas()[k].to_numpy() for k in sdata.SAMPLE_COLUMNS}
        assert data.n_samples == len(ref["target"]) and _rows(got) == _rows(ref)
        assert data.val.n_users == 12
        assert sorted(int(t[0]) for t in data.val.targets) == sorted(valid["item_idx"].tolist())
        np.testing.assert_array_equal(
            data.item_counts, np.bincount(train["item_idx"], minlength=items.n_items)
        )
        np.testing.assert_array_equal(data.target_counts, np.bincount(ref["target"], minlength=items.n_items))
        train_m, full_m = cooc_matrices(data.user_items, items.n_items, 20)
        sim_train, sim_full = train_m["itemknn"], full_m["itemknn"]
        np.testing.assert_allclose(sim_train.toarray(), cooc_matrix(train, items, 20).toarray(), atol=1e-6)
        np.testing.assert_allclose(sim_full.toarray(), cooc_matrix(d, items, 20).toarray(), atol=1e-6)


def test_unknown_items_and_no_validation(ray_local, planted_frame):
    items, df = planted_frame
    data = training_data(df, items, max_len=10, val_users=0, n_blocks=2)
    assert data.val is None and data.n_events == len(df)
    bad = pd.concat([df, df.head(1).assign(**{ITEM_ID: "nope"})], ignore_index=True)
    with pytest.raises(Exception, match="not in the item space"):
        training_data(bad, items, max_len=10, val_users=0, n_blocks=2)
