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
        log.append(evs[7:12])  # a batch is never split: the first segment ends with 12 records
        log.append(evs[12:23])
        log.append(evs[23:25])
        assert log.last_seq == 25
    segs = segment_paths(tmp_path)
    assert [(s, first) for s, first, _ in segs] == [(2, 1), (2, 13), (2, 24)]
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
    # a separate process writes and is killed without close(); this process reads what it acknowledged.
    # os._exit keeps the page cache, so the data alone would survive without any fsync: the child also
    # records every os.fsync (path and size at that moment), and every acknowledged byte must have been
    # fsync'd before the acknowledgement, plus the folder (the new segment's directory entry).
    code = (
        "import os, sys, json\n"
        "calls = []\n"
        "real = os.fsync\n"
        "def spy(fd):\n"
        "    real(fd)\n"
        "    p = os.readlink(f'/proc/self/fd/{fd}')\n"
        "    calls.append([p, os.fstat(fd).st_size])\n"
        "os.fsync = spy\n"
        "from llmrec.state.event_log import EventLog\n"
        "from llmrec.state.user_state import Event\n"
        f"log = EventLog({str(tmp_path)!r}, shard=1)\n"
        "log.append([Event(event_id=f'e{k}', user_id='u', item_id='i', event='like', ts=1.0)\n"
        "            for k in range(50)])\n"
        "print('acked', log.last_seq, json.dumps(calls), flush=True)\n"
        "os._exit(0)\n"  # no close, no flush of Python objects
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    acked, last, calls = out.stdout.split(" ", 2)
    assert (acked, last) == ("acked", "50")
    seg = segment_paths(tmp_path, 1)[0][2]
    synced = {p: size for p, size in json.loads(calls)}
    assert synced.get(str(seg)) == seg.stat().st_size  # every acknowledged byte was fsync'd
    assert str(tmp_path) in synced  # and the directory entry of the new segment
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
    # a restarted writer cuts the torn tail off (never acknowledged) and continues in a new segment
    size = seg.stat().st_size
    with EventLog(tmp_path, shard=0) as log:
        assert log.last_seq == 3
        log.append([mk(3)])
    assert seg.stat().st_size == size - len(full) // 2
    counters = {}
    assert [r["seq"] for r in iter_events(tmp_path, counters=counters)] == [1, 2, 3, 4]
    assert counters["torn"] == 0
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
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]  # no temporary file left
    with pytest.raises(ValueError, match="non-empty string"):
        forget_user(tmp_path, "")


def test_forget_users_rewrites_only_the_users_batches_as_the_careful_rewrite_would(tmp_path: Path) -> None:
    """The fast purge (a pattern scan; only batches holding the users are decoded and re-framed) leaves
    exactly the bytes of the careful one (every record decoded, re-encoded), skips segments without the
    users, and is not fooled by ids, event ids or texts that contain the pattern it scans for."""
    import random
    import shutil

    from llmrec.state.event_log import _drop_users, _rewrite_without, user_tokens

    rng = random.Random(0)
    users = ["plain", 'a"b', "back\\slash", "\u00fcn\u00ef\u2028", 'x,"user_id":"plain', "other"]
    k = 0
    src = tmp_path / "src"
    with EventLog(src, segment_max_events=7, shard=0) as log:
        for _ in range(40):
            batch = []
            for _ in range(rng.randint(1, 4)):
                u = rng.choice(users)
                kw = {"text": 'say "user_id":"plain" ok', "text_vec": [0.25, -1.5]} if k % 5 == 0 else {}
                batch.append(Event(event_id=f'e{k},"user_id":"plain"' if k % 7 == 0 else f"e{k}", user_id=u,
                                   item_id=f"i{k}", event="click", ts=1000.0 + k, **kw))
                k += 1
            log.append(batch)
        log.rotate()
        log.append([mk(1000 + j, user="other") for j in range(7)])  # a segment without the users
    old = [json.dumps({"seq": 9999 + j, **mk(2000 + j, user="plain").to_dict()}) + "\n" for j in range(2)]
    (src / "s000-000000009999.jsonl").write_text("".join(old))  # lines from before checksums, own layout
    gone = {"plain": None, 'a"b': 60, 'x,"user_id":"plain': None}
    cap = {u: float("inf") if m is None else m for u, m in gone.items()}
    want = [r for r in iter_events(src) if r["seq"] > cap.get(r["user_id"], -1)]
    ref, fast = tmp_path / "ref", tmp_path / "fast"
    shutil.copytree(src, ref)
    shutil.copytree(src, fast)
    inodes = {p.name: p.stat().st_ino for _s, _f, p in segment_paths(fast, 0)}
    removed = _rewrite_without(fast, 0, gone)
    n_all = sum(1 for _ in iter_events(src))
    assert removed == _rewrite_without(ref, 0, gone, fast=False) == n_all - len(want) > 0
    assert list(iter_events(fast)) == want
    assert [p.name for _s, _f, p in segment_paths(fast, 0)] == [p.name for _s, _f, p in segment_paths(ref, 0)]
    for _s, _f, p in segment_paths(ref, 0):
        assert (fast / p.name).read_bytes() == p.read_bytes(), p.name
    for _s, _f, p in segment_paths(src, 0):  # each checksummed segment took the fast path, none fell back
        legacy = p.name == "s000-000000009999.jsonl"
        assert (_drop_users(p.read_bytes(), gone, user_tokens(gone)) is None) == legacy
    untouched = [p for _s, _f, p in segment_paths(fast, 0) if b'"user_id":"other"' in p.read_bytes()
                 and p.read_bytes() == (src / p.name).read_bytes()]
    assert untouched and all(p.stat().st_ino == inodes[p.name] for p in untouched)  # not rewritten


def test_append_refuses_events_without_id(tmp_path: Path) -> None:
    with EventLog(tmp_path) as log:
        with pytest.raises(ValueError, match=r"events\[1\] has no event_id"):
            log.append([mk(0), Event(user_id="u", item_id="i", event="like", ts=1.0)])
        assert log.last_seq == 0
    with pytest.raises(ValueError, match="segment_max_events"):
        EventLog(tmp_path, segment_max_events=0)


# ---- faults: failed writes, closed descriptors, damaged records (issue 15, data integrity) ----------------


class _FailingFsync:
    """os.fsync that fails (ENOSPC, like a full disk) for the next `n` calls on files named *.jsonl."""

    def __init__(self, n: int = 1) -> None:
        import os

        self.real, self.n = os.fsync, n

    def __call__(self, fd: int) -> None:
        import errno
        import os

        if self.n > 0 and os.readlink(f"/proc/self/fd/{fd}").endswith(".jsonl"):
            self.n -= 1
            raise OSError(errno.ENOSPC, "No space left on device")
        self.real(fd)


def test_failed_fsync_rolls_the_batch_back_and_is_a_server_fault(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed append leaves no half batch and no seq gap or duplicate; the error is not a client error."""
    import os

    from llmrec.state.errors import StateUnavailable

    with EventLog(tmp_path, shard=0) as log:
        log.append([mk(0), mk(1)])
        monkeypatch.setattr(os, "fsync", _FailingFsync(1))
        with pytest.raises(StateUnavailable, match="rolled back") as exc:
            log.append([mk(2), mk(3), mk(4)])
        assert not isinstance(exc.value, ValueError)  # the API would answer a ValueError with 422
        assert log.last_seq == 2
        log.append([mk(5)])
    recs = list(iter_events(tmp_path))
    assert [(r["seq"], r["event_id"]) for r in recs] == [(1, "e0"), (2, "e1"), (3, "e5")]
    with EventLog(tmp_path, shard=0) as log:  # a restart does not bring the refused batch back either
        assert log.last_seq == 3


def test_failed_rollback_is_repaired_before_the_next_append(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from llmrec.state.errors import LogWriteError

    real_trunc = os.ftruncate
    with EventLog(tmp_path, shard=0) as log:
        log.append([mk(0)])
        monkeypatch.setattr(os, "fsync", _FailingFsync(2))  # the append's fsync and the roll-back's fsync
        with pytest.raises(LogWriteError):
            log.append([mk(1), mk(2)])
        monkeypatch.setattr(os, "ftruncate", real_trunc)
        log.append([mk(3)])
    assert [r["event_id"] for r in iter_events(tmp_path)] == ["e0", "e3"]
    assert [r["seq"] for r in iter_events(tmp_path)] == [1, 2]


def test_a_failed_close_does_not_poison_later_appends(tmp_path: Path) -> None:
    """The segment's descriptor is closed behind the log's back, so its close fails (EBADF): the next append
    must still work (it used to fail forever with "I/O operation on closed file", a ValueError = 422)."""
    import os

    with EventLog(tmp_path, shard=0, segment_max_events=2) as log:
        log.append([mk(0)])
        seg = str(segment_paths(tmp_path)[0][2])
        fds = [int(fd) for fd in os.listdir("/proc/self/fd")
               if os.path.realpath(f"/proc/self/fd/{fd}") == seg]
        assert fds, "the open segment has no descriptor"
        for fd in fds:
            os.close(fd)
        log.forget_user("nobody")  # closes the open segment: that close fails
        log.append([mk(1), mk(2)])
        log.append([mk(3)])
    assert [r["event_id"] for r in iter_events(tmp_path)] == ["e0", "e1", "e2", "e3"]


def test_damaged_record_mid_segment_stops_recovery(tmp_path: Path) -> None:
    from llmrec.state.errors import LogCorruption

    with EventLog(tmp_path, shard=0) as log:
        log.append([mk(0), mk(1, item="abc")])
        log.append([mk(2)])
    seg = segment_paths(tmp_path)[0][2]
    data = seg.read_bytes()
    pos = data.index(b"abc1")
    seg.write_bytes(data[:pos] + b"abd1" + data[pos + 4:])  # bit rot: still valid JSON, wrong content
    with pytest.raises(LogCorruption, match=r"line 2 .*followed by valid records"):
        list(iter_events(tmp_path))
    with pytest.raises(LogCorruption):
        EventLog(tmp_path, shard=0)  # the writer refuses to continue it too
    seg.write_bytes(data)
    assert len(list(iter_events(tmp_path))) == 3


def test_only_the_last_segment_may_end_torn(tmp_path: Path) -> None:
    """A crash mid-batch: the incomplete batch is dropped whole from the last segment (torn tail); the same
    damage at the end of an earlier segment is corruption."""
    from llmrec.state.errors import LogCorruption

    with EventLog(tmp_path, shard=0, segment_max_events=2) as log:
        log.append([mk(0), mk(1)])
        log.append([mk(2), mk(3), mk(4)])
    first, last = (p for _s, _f, p in segment_paths(tmp_path))
    lines = last.read_bytes().splitlines(keepends=True)
    last.write_bytes(b"".join(lines[:2]))  # 2 of the 3 records of the batch reached the disk
    counters: dict[str, int] = {}
    assert [r["event_id"] for r in iter_events(tmp_path, counters=counters)] == ["e0", "e1"]
    assert counters["torn"] == 2
    with EventLog(tmp_path, shard=0) as log:  # cut at open: the incomplete batch never comes back
        assert log.last_seq == 2
        log.append([mk(5)])
    assert [r["event_id"] for r in iter_events(tmp_path)] == ["e0", "e1", "e5"]
    f_lines = first.read_bytes().splitlines(keepends=True)
    first.write_bytes(f_lines[0])  # now the first segment ends inside its batch
    with pytest.raises(LogCorruption, match="not the shard's last"):
        list(iter_events(tmp_path))


def test_records_are_compact_and_text_vectors_round_trip_as_float32(tmp_path: Path) -> None:
    vec = np.random.default_rng(0).normal(size=384).tolist()
    ev = Event.from_dict({"event_id": "t1", "user_id": "u", "event": "like", "text": "more space",
                          "text_vec": vec, "ts": 5.0})
    assert ev.text_vec == np.asarray(vec, np.float32).tolist()  # rounded once, before it is applied
    with EventLog(tmp_path, shard=0) as log:
        log.append([ev, mk(1)])
    lines = segment_paths(tmp_path)[0][2].read_bytes().splitlines()
    assert b"null" not in lines[1] and len(lines[1]) < 160
    assert len(lines[0]) < 2300  # base64 float32, not ~7,500 characters of JSON numbers
    got = next(iter_events(tmp_path))
    assert got["text_vec"] == ev.text_vec
    assert Event.from_dict({k: v for k, v in got.items() if k not in ("seq", "shard")}) == ev


def test_logs_written_before_checksums_are_still_read(tmp_path: Path) -> None:
    old = [json.dumps({"seq": k + 1, **mk(k).to_dict()}) + "\n" for k in range(3)]
    (tmp_path / "s000-000000000001.jsonl").write_text("".join(old) + old[0][:10])  # old torn tail
    (tmp_path / "s000-000000000004.jsonl").write_text(json.dumps({"seq": 4, **mk(3).to_dict()}) + "\n")
    assert [r["seq"] for r in iter_events(tmp_path)] == [1, 2, 3, 4]
    with EventLog(tmp_path, shard=0) as log:
        assert log.last_seq == 4
        log.append([mk(4)])
    assert [r["event_id"] for r in iter_events(tmp_path)] == ["e0", "e1", "e2", "e3", "e4"]


def test_read_events_keys_duplicates_on_user_and_event_id(tmp_path: Path) -> None:
    """Two users' events that share an id are both training data; a true repeat is kept once."""
    with EventLog(tmp_path, shard=0) as log:
        log.append([mk(0, user="a"), mk(0, user="b")])  # both have event_id "e0"
        log.append([mk(0, user="a")])
    df = read_events(tmp_path)
    assert sorted(df[USER_ID]) == ["a", "b"]


def test_retire_deletes_only_old_segments_a_snapshot_covers(tmp_path: Path) -> None:
    import os

    with EventLog(tmp_path, shard=0, segment_max_events=2) as log:
        for k in range(0, 6, 2):
            log.append([mk(k), mk(k + 1)])
        segs = [p for _s, _f, p in segment_paths(tmp_path)]
        for p in segs:
            os.utime(p, (1, 1))  # long ago
        assert log.retire(upto_seq=3, older_than_s=3600) == [segs[0]]  # seg 2 holds seq 4 > 3
        assert log.retire(upto_seq=6, older_than_s=3600) == [segs[1]]  # never the last segment
        os.utime(segs[2], None)
        log.append([mk(6)])
        assert log.retire(upto_seq=7, older_than_s=3600) == []  # seg 3 is recent
    assert [r["seq"] for r in iter_events(tmp_path)] == [5, 6, 7]


def _purge_fixture(root: Path) -> tuple[Path, Path]:
    """The same log twice (`a`, `b`): users u0..u4, 60 events in 1-3 event batches over several segments."""
    import shutil

    a = root / "a"
    with EventLog(a, segment_max_events=8, shard=0) as log:
        for k in range(0, 60, 3):
            log.append([mk(k + j, user=f"u{(k + j) % 5}") for j in range(1 + k % 3)])
    shutil.copytree(a, root / "b")
    return a, root / "b"


def test_a_purge_runs_in_the_logs_worker_process_and_leaves_the_in_process_bytes(tmp_path: Path) -> None:
    """`EventLog.forget_users` runs the rewrite in a child process (the shard's GIL stays with its
    requests) and leaves exactly the bytes the same rewrite leaves when run in this process."""
    import os

    from llmrec.state.event_log import _rewrite_without

    a, b = _purge_fixture(tmp_path)
    gone = {"u1": None, "u3": 30}
    with EventLog(a, shard=0) as log:
        upto = log.last_seq
        assert log.purge_worker_stats() == {"pid": None, "jobs": 0, "in_process": 0, "starts": 0}
        removed = log.forget_users(gone)
        st = log.purge_worker_stats()
        assert st["pid"] is not None and st["pid"] != os.getpid()
        assert (st["jobs"], st["in_process"], st["starts"]) == (1, 0, 1)
        assert log.forget_users({"u2": None}) > 0 and log.purge_worker_stats()["pid"] == st["pid"]  # reused
        worker = st["pid"]
    assert _rewrite_without(b, 0, gone, max_first_seq=upto) == removed > 0
    _rewrite_without(b, 0, {"u2": None}, max_first_seq=upto)
    assert [p.name for _s, _f, p in segment_paths(a, 0)] == [p.name for _s, _f, p in segment_paths(b, 0)]
    for _s, _f, p in segment_paths(b, 0):
        assert (a / p.name).read_bytes() == p.read_bytes(), p.name
    assert not Path(f"/proc/{worker}").exists() or "Z" in _proc_state(worker)  # close() ended the worker


def _proc_state(pid: int) -> str:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        return next(ln for ln in lines if ln.startswith("State"))
    except (FileNotFoundError, ProcessLookupError):
        return "State: gone (Z)"


def test_a_dead_purge_worker_is_replaced_and_a_worker_that_cannot_start_leaves_the_purge_in_process(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import signal
    import time

    a, _b = _purge_fixture(tmp_path)
    with EventLog(a, shard=0) as log:
        assert log.forget_users({"u1": None}) > 0
        first = log.purge_worker_stats()["pid"]
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while log.purge_worker_stats()["pid"] is not None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert log.forget_users({"u2": None}) > 0
        st = log.purge_worker_stats()
        assert st["pid"] not in (None, first) and (st["jobs"], st["in_process"], st["starts"]) == (2, 0, 2)

        log._purger.close()  # the next job needs a new worker, and none can start
        monkeypatch.setattr("llmrec.state.purge_worker.subprocess.Popen",
                            lambda *a, **kw: (_ for _ in ()).throw(OSError(24, "Too many open files")))
        assert log.forget_users({"u3": None}) > 0
        assert log.purge_worker_stats()["in_process"] == 1
    assert {r["user_id"] for r in iter_events(a)} == {"u0", "u4"}


def test_a_purge_workers_error_is_raised_in_the_shard_as_the_rewrite_raises_it(tmp_path: Path) -> None:
    """An OSError in the worker comes back as an OSError with its errno (the store's retry and backoff
    handle it as before: not as a crash of the shard)."""
    import errno

    from llmrec.state.event_log import _rewrite_without

    a, b = _purge_fixture(tmp_path)
    for d in (a, b):  # a folder where a segment should be: reading it fails with EISDIR
        (d / "s000-000000000000.jsonl").mkdir()
    with pytest.raises(OSError) as here:
        _rewrite_without(b, 0, {"u1": None})
    with EventLog(a, shard=0) as log, pytest.raises(OSError) as there:
        log.forget_users({"u1": None})
    assert here.value.errno == there.value.errno == errno.EISDIR and "purge worker" in str(there.value)


def test_a_purge_worker_ends_with_its_shard_process_and_waits_for_the_purge_lock(tmp_path: Path) -> None:
    """A worker whose shard process was killed (-9) exits once its stdin closes; while a segment rewrite
    holds the shard's purge lock, another rewrite (a restarted shard's) waits for it."""
    import threading
    import time

    from llmrec.state.event_log import _purge_lock

    a, _b = _purge_fixture(tmp_path)
    code = ("import sys, time; from llmrec.state.event_log import EventLog\n"
            f"log = EventLog({str(a)!r}, shard=0); log.forget_users({{'u1': None}})\n"
            "print(log.purge_worker_stats()['pid'], flush=True); time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        worker = int(parent.stdout.readline())
        assert "Z" not in _proc_state(worker)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 10
        while "Z" not in _proc_state(worker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "Z" in _proc_state(worker), "the purge worker outlived its shard process"
    finally:
        parent.kill()
        parent.stdout.close()

    done = threading.Event()
    with EventLog(a, shard=0) as log:
        with _purge_lock(a, 0):
            t = threading.Thread(target=lambda: (log.forget_users({"u2": None}), done.set()))
            t.start()
            assert not done.wait(0.5)  # the rewrite waits for the lock
        t.join(30)
        assert done.is_set()
    assert "u2" not in {r["user_id"] for r in iter_events(a)}
