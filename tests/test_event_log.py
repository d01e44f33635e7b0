"""Event log: append/read round trip, durability, torn lines, segments, read_events, forget_user."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from llmrec.schema import EVENT, ITEM_ID, RATING, TS, USER_ID
from llmrec.state.event_log import EventLog, forget_user, iter_events, read_events, segment_paths
from llmrec.state.user_state import Event


def mk(k: int, user: str = "u1", item: str | None = "i", kind: str = "click", **kw) -> Event:
    return Event(event_id=f"e{k}", user_id=user, item_id=item if item is None else f"{item}{k}", event=kind,
                 ts=1000.0 + k + 0.7, **kw)


def test_append_read_round_trip_and_segments(tmp_path: Path) -> None:
    evs = [mk(k, user=f"u{k % 3}") for k in range(25)]
    with EventLog(tmp_path, segment_max_events=10, shard=2) as log:
        log.append(evs[:7])
        log.append(evs[7:25])  # crosses two segment boundaries
        assert log.last_seq == 25
    segs = segment_paths(tmp_path)
    assert [(s, first) for s, first, _ in segs] == [(2, 1), (2, 11), (2, 21)]
    recs = list(iter_events(tmp_path))
    assert [r["seq"] for r in recs] == list(range(1, 26)) and {r["shard"] for r in recs} == {2}
    assert [Event.from_dict({k: v for k, v in r.items() if k not in ("seq", "shard")}) for r in recs] == evs
    assert [r["seq"] for r in iter_events(tmp_path, shard=2, after_seq=18)] == list(range(19, 26))
    assert list(iter_events(tmp_path, shard=0)) == []


def test_new_writer_continues_seq_in_a_new_segment_and_lock_refuses_second_writer(tmp_path: Path) -> None:
    with EventLog(tmp_path, shard=0) as log:
        log.append([mk(0), mk(1)])
        with pytest.raises(ValueError, match="locked by another writer"):
            EventLog(tmp_path, shard=0, lock_timeout_s=0.2)
    with EventLog(tmp_path, shard=0) as log2:
        assert log2.last_seq == 2
        log2.append([mk(2)])
    assert [first for _, first, _ in segment_paths(tmp_path)] == [1, 3]
    assert [r["event_id"] for r in iter_events(tmp_path)] == ["e0", "e1", "e2"]
    with EventLog(tmp_path, shard=0, min_next_seq=100) as log3:  # a snapshot seq ahead of the files
        log3.append([mk(3)])
    assert [r["seq"] for r in iter_events(tmp_path)] == [1, 2, 3, 100]


def test_fsynced_data_survives_a_new_reader_process(tmp_path: Path) -> None:
    # a separate process writes and is killed without close(); this process reads what it acknowledged
    code = (
        "import os, sys\n"
        "from llmrec.state.event_log import EventLog\n"
        "from llmrec.state.user_state import Event\n"
        f"log = EventLog({str(tmp_path)!r}, shard=1)\n"
        "log.append([Event(event_id=f'e{k}', user_id='u', item_id='i', event='like', ts=1.0)\n"
        "            for k in range(50)])\n"
        "print('acked', log.last_seq, flush=True)\n"
        "os._exit(0)\n"  # no close, no flush of Python objects
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "acked 50" in out.stdout
    assert [r["event_id"] for r in iter_events(tmp_path, shard=1)] == [f"e{k}" for k in range(50)]
    with EventLog(tmp_path, shard=1) as log:  # the dead writer's lock is free again
        assert log.last_seq == 50


def test_torn_last_line_is_skipped_counted_and_warned(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                     ) -> None:
    with EventLog(tmp_path, shard=0) as log:
        log.append([mk(0), mk(1), mk(2)])
    seg = segment_paths(tmp_path)[0][2]
    full = json.dumps({"seq": 4, **mk(3).to_dict()})
    with open(seg, "a") as f:
        f.write(full[: len(full) // 2])  # the crash came mid-write
    counters: dict[str, int] = {}
    with caplog.at_level(logging.WARNING, logger="llmrec.state.event_log"):
        recs = list(iter_events(tmp_path, counters=counters))
    assert [r["seq"] for r in recs] == [1, 2, 3]
    assert counters == {"torn": 1, "records": 3}
    assert "skipped 1 torn" in caplog.text
    # a restarted writer does not glue its records onto the torn line
    with EventLog(tmp_path, shard=0) as log:
        assert log.last_seq == 3
        log.append([mk(3)])
    counters = {}
    assert [r["seq"] for r in iter_events(tmp_path, counters=counters)] == [1, 2, 3, 4]
    assert counters["torn"] == 1
    assert len(read_events(tmp_path)) == 4


def test_read_events_canonical_schema(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    evs = [
        mk(0, kind="rating", value=4.5), mk(1, kind="like"),
        Event(event_id="t", user_id="u1", event="dislike", text="no horror", ts=1001.0),  # text-only
        mk(2, user="u2", kind="view", value=None),
    ]
    with EventLog(tmp_path, shard=0) as log:
        log.append(evs)
        log.append([mk(1, kind="like")])  # the same event id again (a retry that reached the log)
    with caplog.at_level(logging.INFO, logger="llmrec.state.event_log"):
        df = read_events(tmp_path)
    assert list(df.columns) == [USER_ID, ITEM_ID, TS, RATING, EVENT]
    assert df[TS].dtype == np.int64 and df[RATING].dtype == np.float64
    expected = pd.DataFrame({
        USER_ID: ["u1", "u1", "u2"], ITEM_ID: ["i0", "i1", "i2"], TS: np.array([1000, 1001, 1002], np.int64),
        RATING: [4.5, np.nan, np.nan], EVENT: ["rating", "like", "view"],
    })
    pd.testing.assert_frame_equal(df, expected, check_dtype=False)
    assert "1 text-only events left out, 1 duplicate ids dropped" in caplog.text
    empty = read_events(tmp_path / "nothing")
    assert list(empty.columns) == [USER_ID, ITEM_ID, TS, RATING, EVENT] and len(empty) == 0


def test_forget_user_rewrites_segments(tmp_path: Path) -> None:
    with EventLog(tmp_path, segment_max_events=4, shard=0) as log:
        log.append([mk(k, user="gone" if k < 4 or k % 3 == 0 else "stay") for k in range(10)])
        # first segment (seq 1-4) is only "gone": it disappears; the writer keeps going afterwards
        assert log.forget_user("gone") == 6
        log.append([mk(10, user="gone"), mk(11, user="stay")])
    recs = list(iter_events(tmp_path))
    assert [r["user_id"] for r in recs] == ["stay"] * 4 + ["gone", "stay"]
    assert [r["seq"] for r in recs] == [5, 6, 8, 9, 11, 12]
    assert forget_user(tmp_path, "gone") == 1 and forget_user(tmp_path, "gone") == 0
    assert set(read_events(tmp_path)[USER_ID]) == {"stay"}
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ValueError, match="non-empty string"):
        forget_user(tmp_path, "")


def test_append_refuses_events_without_id(tmp_path: Path) -> None:
    with EventLog(tmp_path) as log:
        with pytest.raises(ValueError, match=r"events\[1\] has no event_id"):
            log.append([mk(0), Event(user_id="u", item_id="i", event="like", ts=1.0)])
        assert log.last_seq == 0
    with pytest.raises(ValueError, match="segment_max_events"):
        EventLog(tmp_path, segment_max_events=0)
