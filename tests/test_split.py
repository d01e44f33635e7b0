"""Split invariants: last-by-time chosen, no test event in train, deterministic ties, cold items/users, and
the held-out-items ("cold") split against a brute-force construction."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from llmrec.eval.split import cold_item_split, leave_last_out, time_split


def _events(rows: list[tuple[str, str, int]]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "ts"])
    return df.assign(ts=df["ts"].astype("int64"), rating=np.nan, event="view")


def _random_events(seed: int, n: int = 400) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return _events(
        [(f"u{rng.integers(0, 30)}", f"i{rng.integers(0, 50)}", int(rng.integers(0, 100))) for _ in range(n)]
    )


def test_loo_takes_last_by_time_and_previous_as_valid() -> None:
    df = _events([("a", "x", 5), ("a", "y", 1), ("a", "z", 9), ("a", "w", 3), ("b", "x", 1), ("b", "y", 2)])
    s = leave_last_out(df)
    assert s.test[["user_id", "item_id"]].values.tolist() == [["a", "z"]]
    assert s.valid[["user_id", "item_id"]].values.tolist() == [["a", "x"]]
    assert sorted(s.train.loc[s.train.user_id == "a", "item_id"]) == ["w", "y"]
    assert s.stats["n_users_train_only"] == 1  # b has only 2 events
    assert (s.train.user_id == "b").sum() == 2
    assert sorted(s.history.loc[s.history.user_id == "a", "item_id"]) == ["w", "x", "y"]


def test_loo_invariants_on_random_events() -> None:
    df = _random_events(1)
    s = leave_last_out(df)
    assert len(s.train) + len(s.valid) + len(s.test) == len(df)  # nothing dropped
    key = ["user_id", "item_id", "ts"]
    merged = s.test.merge(s.train, on=key, how="inner")
    assert merged.empty  # no test event in train
    for _, row in s.test.iterrows():
        u_events = df[df.user_id == row.user_id]
        assert row.ts == u_events.ts.max()  # last by time
        v = s.valid[s.valid.user_id == row.user_id].iloc[0]
        assert s.train[s.train.user_id == row.user_id].ts.max() <= v.ts <= row.ts
    assert s.test.user_id.is_unique


def test_ties_are_seeded_random_and_order_independent() -> None:
    """Same-timestamp events: the order is a seeded draw, the same whatever the input row order, and over
    seeds each of a user's tied last events is the target about equally often (never by item id)."""
    df = _events([("a", "q", 7), ("a", "b", 7), ("a", "m", 7), ("a", "c", 1)])
    s1 = leave_last_out(df, seed=0)
    s2 = leave_last_out(df.iloc[::-1].reset_index(drop=True), seed=0)
    pd.testing.assert_frame_equal(s1.test, s2.test)
    pd.testing.assert_frame_equal(s1.valid, s2.valid)
    assert s1.test["ts_tied"].tolist() == [True] and s1.stats["n_test_ts_tied"] == 1
    assert s1.train.item_id.tolist()[0] == "c"  # the untied earlier event stays first
    counts = pd.Series([leave_last_out(df, seed=k).test.item_id.iloc[0] for k in range(300)]).value_counts()
    # ~100 each; item-id order gave 300 x "q"
    assert set(counts.index) == {"q", "b", "m"} and counts.min() > 60
    rnd = _random_events(2)
    a = time_split(rnd, test_frac=0.2)
    b = time_split(rnd.sample(frac=1.0, random_state=3), test_frac=0.2)
    pd.testing.assert_frame_equal(a.test, b.test)
    pd.testing.assert_frame_equal(a.train, b.train)
    # the flag: another event of the user at the target's second
    flags = {(r.user_id, r.ts): r.ts_tied for r in a.test.itertuples()}
    for (u, ts), tied in flags.items():
        assert tied == (((rnd.user_id == u) & (rnd.ts == ts)).sum() > 1)


def test_time_split_cold_items_and_users() -> None:
    df = _events(
        [
            ("a", "x", 1),
            ("a", "y", 2),
            ("b", "x", 3),
            ("b", "y", 4),  # train (cutoff 4)
            ("a", "new", 5),
            ("a", "x", 6),  # a: first post-cutoff = new (cold item)
            ("b", "y", 7),  # b: repeat of a train item, still a target
            ("c", "x", 8),  # c: cold user (no train history)
        ]
    )
    s = time_split(df, cutoff_ts=4)
    assert s.test[["user_id", "item_id", "is_cold"]].values.tolist() == [
        ["a", "new", True],
        ["b", "y", False],
    ]
    assert s.cold_items.tolist() == ["new"]
    assert s.cold_users.tolist() == ["c"]
    assert s.stats["n_cold_test_events"] == 1
    assert (s.train.ts <= 4).all() and len(s.train) == 4
    s_all = time_split(df, cutoff_ts=4, targets="all")
    assert s_all.test[["user_id", "item_id"]].values.tolist() == [["a", "new"], ["a", "x"], ["b", "y"]]


def test_time_split_default_cutoff_and_invariants() -> None:
    df = _random_events(4, n=1000)
    s = time_split(df, test_frac=0.1)
    assert 0.05 < s.stats["post_cutoff_frac"] <= 0.11
    assert (s.train.ts <= s.stats["cutoff_ts"]).all() and (s.test.ts > s.stats["cutoff_ts"]).all()
    train_items = set(s.train.item_id)
    assert set(s.cold_items).isdisjoint(train_items)
    assert s.test.is_cold.tolist() == [i not in train_items for i in s.test.item_id]
    assert set(s.test.user_id) <= set(s.train.user_id)
    first = (
        df[df.ts > s.stats["cutoff_ts"]].sort_values(["user_id", "ts", "item_id"]).groupby("user_id").head(1)
    )
    first = first[first.user_id.isin(set(s.train.user_id))]
    assert sorted(map(tuple, first[["user_id", "item_id"]].values)) == sorted(
        map(tuple, s.test[["user_id", "item_id"]].values)
    )


def test_bad_input() -> None:
    with pytest.raises(ValueError, match=r"lack columns \['user_id'\]"):
        leave_last_out(pd.DataFrame({"user": ["a"], "item_id": ["x"], "ts": [1]}))
    with pytest.raises(ValueError, match="null user_id / item_id / ts"):
        leave_last_out(pd.DataFrame({"user_id": ["a", "a"], "item_id": ["x", None], "ts": [1, 2]}))
    with pytest.raises(ValueError, match="cutoff"):
        time_split(_events([("a", "x", 1), ("a", "y", 2)]), cutoff_ts=10)
    with pytest.raises(ValueError, match="test_frac"):
        time_split(_events([("a", "x", 1), ("a", "y", 2)]), test_frac=1.5)


# ------------------------------------------------------------------------------------------- cold items


def _brute_force_cold(df: pd.DataFrame, held: set[str]) -> tuple[list, list, list, dict]:
    """Reference for cold_item_split given the held-out items, with plain loops over the events."""
    rows = sorted(df[["user_id", "ts", "item_id", "event"]].itertuples(index=False, name=None))
    train = [r for r in rows if r[2] not in held]
    train_users = {r[0] for r in train}
    test, seen = [], set()
    repeats = cold_user_events = 0
    for u, ts, i, _ in rows:  # in (user, ts, item) order: the first event of a (user, item) pair is its row
        if i not in held:
            continue
        if u not in train_users:
            cold_user_events += 1
        elif (u, i) in seen:
            repeats += 1
        else:
            seen.add((u, i))
            test.append((u, i, ts))
    cold_users = sorted({r[0] for r in rows if r[2] in held} - train_users)
    counts = {"repeats": repeats, "cold_user_events": cold_user_events}
    return train, sorted(test), cold_users, counts


def test_cold_split_hand_made() -> None:
    # 10 items; frac 0.2 holds out 2. a repeats i8; c only ever saw i8 and i9 (a cold user when both are held)
    rows = [("a", f"i{k}", k) for k in range(8)] + [("a", "i8", 20), ("a", "i8", 21), ("a", "i9", 3)]
    rows += [("b", "i0", 1), ("b", "i9", 2), ("b", "i8", 0), ("c", "i9", 5), ("c", "i8", 6)]
    df = _events(rows)
    seen_cold_user = seen_repeat = False
    for seed in range(40):  # every draw is checked; some hold out i8 and i9 together
        s = cold_item_split(df, frac=0.2, seed=seed)
        held = set(s.cold_items)
        assert len(held) == 2 and held <= {f"i{k}" for k in range(10)}
        assert s.protocol == "cold" and s.valid.empty and s.history is s.train
        train, test, cold_users, counts = _brute_force_cold(df, held)
        got_train = sorted(s.train[["user_id", "ts", "item_id", "event"]].itertuples(index=False, name=None))
        assert got_train == train and not set(s.train.item_id) & held  # held-out items never reach train
        assert sorted(s.test[["user_id", "item_id", "ts"]].itertuples(index=False, name=None)) == test
        assert s.test.is_cold.all() and s.cold_users.tolist() == cold_users
        st = s.stats
        assert (st["n_items"], st["n_heldout_items"], st["n_test"]) == (10, 2, len(test))
        assert st["n_heldout_repeat_events"] == counts["repeats"]
        assert st["n_cold_user_events"] == counts["cold_user_events"]
        assert st["n_cold_users"] == len(cold_users) and st["n_test_users"] == len({t[0] for t in test})
        # every held-out event is a test row, a repeat of one, or a cold user's
        assert st["n_heldout_events"] == df.item_id.isin(held).sum() == len(test) + sum(counts.values())
        assert st["n_train"] + st["n_heldout_events"] == len(df)
        seen_cold_user |= cold_users == ["c"]
        seen_repeat |= counts["repeats"] > 0
    assert seen_cold_user and seen_repeat


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cold_split_random_events(seed: int) -> None:
    df = _random_events(seed, n=600)
    s = cold_item_split(df, frac=0.15, seed=seed)
    n_items = df.item_id.nunique()
    held = set(s.cold_items)
    assert len(held) == round(0.15 * n_items) == s.stats["n_heldout_items"]
    train, test, cold_users, counts = _brute_force_cold(df, held)
    assert len(s.train) == len(train) and not set(s.train.item_id) & held
    assert sorted(s.test[["user_id", "item_id", "ts"]].itertuples(index=False, name=None)) == test
    assert s.cold_users.tolist() == cold_users and set(s.test.user_id) <= set(s.train.user_id)
    assert s.test[["user_id", "item_id"]].drop_duplicates().shape[0] == len(s.test)
    assert s.stats["n_heldout_events"] == len(s.test) + sum(counts.values())
    # deterministic for a seed, independent of the input row order, different for another seed
    again = cold_item_split(df.sample(frac=1.0, random_state=7).reset_index(drop=True), frac=0.15, seed=seed)
    pd.testing.assert_frame_equal(s.test, again.test)
    pd.testing.assert_frame_equal(s.train, again.train)
    assert s.cold_items.tolist() == again.cold_items.tolist() and s.stats == again.stats
    other = cold_item_split(df, frac=0.15, seed=seed + 10)
    assert set(other.cold_items) != held


def test_cold_split_bad_input() -> None:
    df = _events([("a", f"i{k}", k) for k in range(10)])
    for frac in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match=r"frac must be in \(0, 1\)"):
            cold_item_split(df, frac=frac)
    with pytest.raises(ValueError, match="holds out 0"):
        cold_item_split(df, frac=0.01)
    with pytest.raises(ValueError, match="nothing to evaluate"):  # the only user saw only held-out items
        cold_item_split(_events([("a", "x", 1), ("b", "y", 2)]), frac=0.5)


def test_order_helpers_fingerprint_and_seeded_sample() -> None:
    """frame_fingerprint names a set of events (row order and extra columns do not matter, one changed event
    does); sample_rows draws the same rows for a seed, keeps their order, and caps nothing below the limit."""
    from llmrec.data.order import frame_fingerprint, sample_rows

    df = _random_events(4)
    fp = frame_fingerprint(df)
    assert fp == frame_fingerprint(df.sample(frac=1.0, random_state=1).assign(extra=1))
    changed = df.copy()
    changed.loc[0, "ts"] += 1
    assert frame_fingerprint(changed) != fp and len(fp) == 16
    a, b = sample_rows(df, 50, seed=2), sample_rows(df, 50, seed=2)
    pd.testing.assert_frame_equal(a, b)
    assert len(a) == 50 and not a.equals(sample_rows(df, 50, seed=3))
    pos = df.reset_index(drop=True).merge(a.reset_index(), on=list(df.columns))["index"]
    assert pos.is_monotonic_increasing  # drawn rows keep the input order
    pd.testing.assert_frame_equal(sample_rows(df, len(df) + 5, seed=0), df.reset_index(drop=True))
