"""llmrec.data.histories: the one `attach_item_idx` (unknown items raise or are dropped, counted and logged)
and `make_histories`, against hand-built expectations."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

from llmrec.data.histories import attach_item_idx, item_lookup, make_histories
from llmrec.protocol import ItemSpace
from llmrec.schema import EVENT, ITEM_ID, ITEM_IDX, RATING, TS, USER_ID

SPACE = ItemSpace(np.array(["a", "b", "c"]), np.eye(3, dtype=np.float32))


def _events(items: list[str]) -> pd.DataFrame:
    n = len(items)
    return pd.DataFrame({USER_ID: ["u"] * n, ITEM_ID: items, TS: np.arange(n), EVENT: ["click"] * n})


def test_known_items_get_their_rows_in_both_modes() -> None:
    df = _events(["c", "a", "b"])
    for unknown in ("raise", "drop"):
        out = attach_item_idx(df, SPACE, unknown=unknown)
        assert out[ITEM_IDX].tolist() == [2, 0, 1] and out[ITEM_IDX].dtype == np.int64
        assert out[RATING].isna().all()  # a missing rating column comes back as NaN
    assert ITEM_IDX not in df.columns  # the input is not modified
    lookup = item_lookup(SPACE.item_ids)  # built once, the same rows
    assert attach_item_idx(df, lookup)[ITEM_IDX].tolist() == [2, 0, 1]


def test_unknown_items_raise_by_default_and_are_counted_when_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    df = _events(["a", "zz", "b", "zz", "yy"])
    with pytest.raises(ValueError, match=r"2 item ids .* not in the item space .*'zz'"):
        attach_item_idx(df, SPACE)
    with caplog.at_level(logging.WARNING, logger="llmrec.data.histories"):
        out = attach_item_idx(df, SPACE, unknown="drop")
    assert out[ITEM_ID].tolist() == ["a", "b"] and out[ITEM_IDX].tolist() == [0, 1]
    assert out.index.tolist() == [0, 1]
    assert "dropping 3 of 5 interactions on 2 item(s)" in caplog.text
    with pytest.raises(ValueError, match="no interaction refers to an item"):
        attach_item_idx(_events(["zz"]), SPACE, unknown="drop")
    with pytest.raises(ValueError, match="unknown must be one of"):
        attach_item_idx(df, SPACE, unknown="ignore")  # type: ignore[arg-type]


def test_bad_columns_and_events_are_named() -> None:
    with pytest.raises(ValueError, match=r"lack columns \['ts'\]"):
        attach_item_idx(_events(["a"]).drop(columns=TS), SPACE)
    with pytest.raises(ValueError, match="unknown event kinds"):
        attach_item_idx(_events(["a"]).assign(**{EVENT: "teleport"}), SPACE)
    with pytest.raises(ValueError, match=r"item_idx must lie in \[0, 3\)"):
        attach_item_idx(_events(["a"]).assign(**{ITEM_IDX: 3}), SPACE)


def test_make_histories_in_event_order_one_per_requested_user() -> None:
    df = attach_item_idx(
        pd.DataFrame(
            {USER_ID: ["v", "u", "u"], ITEM_ID: ["a", "c", "b"], TS: [5, 2, 1], EVENT: ["like"] * 3}
        ),
        SPACE,
    )
    h = make_histories(df, ["u", "w", "v"])
    assert [x.user_id for x in h] == ["u", "w", "v"]
    assert h[0].item_idx.tolist() == [1, 2] and h[0].ts.tolist() == [1, 2]  # oldest first
    assert len(h[1].item_idx) == 0  # no events: an empty history
    assert h[2].item_idx.tolist() == [0]
    every = make_histories(df, max_len=1)  # all users, sorted by id; each user's last event
    assert [x.user_id for x in every] == ["u", "v"]
    assert every[0].item_idx.tolist() == [2] and every[0].ts.tolist() == [2]
    assert make_histories(df.iloc[:0]) == []  # no events, no users
    assert len(make_histories(df.iloc[:0], ["u"])[0].item_idx) == 0
    with pytest.raises(ValueError, match="max_len must be >= 1"):
        make_histories(df, max_len=0)
