"""Serving-state figures for issue 15: bytes per user (memory, disk), shard recovery time, and the /feedback
latency of a shard while another client loops DELETE.

    python benchmarks/state_faults.py --users 100000 --out runs/bench/state_faults.json
    python benchmarks/state_faults.py --users 100000 --skip-latency   # memory, disk, recovery only

Memory and recovery use one `UserStateShard` in this process (file backend, snapshots inline, the production
`MeanVectorizer` over a synthetic 10k x 384 item matrix, so each user holds its float32 vector): N users x 20
events each (`--events-per-user`), applied in batches of 1,000 (vectors computed once per user after the
load, as a `get` leaves them). Shard RSS per user = RSS growth / N (after a
GC and malloc_trim); disk per user = (log segments + snapshot) / N. Recovery = a restart from the full
snapshot plus a log tail of `--tail` events (wall and CPU seconds: on a loaded machine the CPU time is the
better guide to an idle one); the restarted shard keeps snapshot users unparsed until first read
(`llmrec.state.table`), so the report also gives its RSS per user, a full snapshot taken right after the
restart, the first and second `get` of 1,000 random users (p50/p99 ms; the first parses the user and
recomputes its vector) and the time to parse every remaining user. Latency: one shard actor on the local
Ray, 1-event /feedback batches through `StateStore.apply` (what the ingress awaits), idle, then while a
second client loops DELETE (known users, then unknown ones); `--log-events N` first fills the shard's log
with N events of other users (10 each), since every purge pass of the deletes works on the whole log;
`--state-url redis://...` runs it on the Redis backend (an empty database: the shard's keys must be new).
Purge pass (`--purge-events`): the log purge of 100 random users' events from a log of N events (20 per
user, 1-4 per batch) as a shard runs it (`forget_users`: a pattern scan, only the users' batches decoded),
against the careful rewrite that decodes and re-encodes every record (the reference its test compares
with), each on its own copy of the log. Prints one JSON report.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from llmrec.artifacts import write_json_report


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _trim() -> None:
    import ctypes

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def _events(n_users: int, per_user: int, ids: list[str], seed: int = 0):
    """(user, event) dicts in batches of 1,000, users interleaved like live traffic."""
    rng = np.random.default_rng(seed)
    kinds = ["view", "click", "like", "dislike", "purchase"]
    batch = []
    for k in range(per_user):
        items = rng.integers(len(ids), size=n_users)
        for u in range(n_users):
            batch.append({"event_id": f"e{u}-{k}", "user_id": f"user-{u:07d}", "item_id": ids[items[u]],
                          "event": kinds[(u + k) % 5], "ts": 1_700_000_000.0 + k})
            if len(batch) == 1000:
                yield batch
                batch = []
    if batch:
        yield batch


def _item_space() -> tuple[list[str], np.ndarray]:
    """10k synthetic item ids and their L2-normalised 384-d vectors (the MeanVectorizer's catalog)."""
    ids = [f"item{k}" for k in range(10_000)]
    vecs = np.random.default_rng(1).normal(size=(10_000, 384)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    return ids, vecs


def measure_memory_and_recovery(n_users: int, per_user: int, tail: int, work: Path) -> dict:
    from llmrec.state.store import UserStateShard
    from llmrec.state.user_state import MeanVectorizer

    ids, vecs = _item_space()

    def factory() -> MeanVectorizer:
        return MeanVectorizer(ids, vecs)

    log = work / "events"
    vectorizer = factory()  # the item matrix is not per-user memory: built before the baseline
    shard = UserStateShard(0, str(log), None, snapshot_every=10**12, background=False)
    _trim()
    rss0 = _rss()
    t0 = time.perf_counter()
    for batch in _events(n_users, per_user, ids):
        shard.apply(batch)
    apply_s = time.perf_counter() - t0
    # one vector per user at the end (as every `get` leaves it) instead of 20 refreshes per user during the
    # bulk load: the same final state, 20x less work on this 2-core machine
    shard.vectorizer = vectorizer
    shard._dirty = set(shard.users)
    for uid in list(shard.users):
        shard.get(uid)
    _trim()
    rss1 = _rss()
    t1, c1 = time.perf_counter(), time.process_time()
    snap = shard.snapshot()
    snapshot_s, snapshot_cpu_s = time.perf_counter() - t1, time.process_time() - c1
    _trim()
    rss_text = _rss()  # the full snapshot turned the users it wrote into its text (UserTable.to_text)
    text_after = shard.users.n_parsed == 0
    for batch in _events(max(1, tail // per_user), per_user, ids, seed=9):  # the log tail after the snapshot
        shard.apply([{**e, "event_id": "t" + e["event_id"]} for e in batch])
    disk_log = sum(p.stat().st_size for p in log.glob("s000-*.jsonl"))
    disk_snap = sum(p.stat().st_size for p in log.glob("snapshot-s000*"))
    n_events = shard.stats()["n_events"]
    shard.close()
    del shard
    _trim()
    rss2 = _rss()
    t2, c2 = time.perf_counter(), time.process_time()
    again = UserStateShard(0, str(log), factory, background=False)  # vectors recompute lazily on get
    recovery_s, recovery_cpu_s = time.perf_counter() - t2, time.process_time() - c2
    replayed = again.replayed
    _trim()
    rss3 = _rss()
    parsed_at_start = again.users.n_parsed
    # the costs the lazy load defers: a full snapshot of mostly unparsed users, the first read of a user
    # (parse + vector; every user's vector is recomputed on its first read after a restart either way), and
    # parsing every user
    t3 = time.perf_counter()
    again.snapshot()
    snapshot_after_s = time.perf_counter() - t3
    sample = [str(u) for u in np.random.default_rng(3).permutation(list(again.users))[:1000]]
    first, second = [], []
    for uid in sample:
        t = time.perf_counter()
        again.get(uid)
        first.append(time.perf_counter() - t)
        t = time.perf_counter()
        again.get(uid)
        second.append(time.perf_counter() - t)
    t4 = time.perf_counter()
    for uid in list(again.users):
        again.users[uid]
    parse_all_s = time.perf_counter() - t4
    again.close()
    return {"users": n_users, "events_per_user": per_user, "events": n_events,
            "apply_events_per_s": round(n_users * per_user / apply_s),
            "shard_rss_bytes_per_user": round((rss1 - rss0) / n_users),
            "shard_rss_bytes_per_user_after_full_snapshot": round((rss_text - rss0) / n_users),
            "users_text_after_full_snapshot": text_after,
            "log_bytes_per_event": round(disk_log / n_events),
            "snapshot_bytes_per_user": round(disk_snap / n_users),
            "disk_bytes_per_user": round((disk_log + disk_snap) / n_users),
            "full_snapshot_s": round(snapshot_s, 2), "full_snapshot_cpu_s": round(snapshot_cpu_s, 2),
            "snapshot_bytes": snap["bytes"],
            "recovery_s": round(recovery_s, 2), "recovery_cpu_s": round(recovery_cpu_s, 2),
            "recovery_replayed_tail": replayed, "recovery_users_parsed": parsed_at_start,
            "recovered_rss_bytes_per_user": round((rss3 - rss2) / n_users),
            "full_snapshot_after_restart_s": round(snapshot_after_s, 2),
            "first_get_ms": _pcts(first), "next_get_ms": _pcts(second),
            "parse_remaining_users_s": round(parse_all_s, 2)}


def _pcts(xs: list[float]) -> dict[str, float]:
    ms = np.asarray(xs) * 1e3
    return {"p50": round(float(np.percentile(ms, 50)), 3), "p99": round(float(np.percentile(ms, 99)), 3)}


def measure_synthetic_restart(n_users: int, work: Path, templates: int = 2000, per_user: int = 20) -> dict:
    """Restart of a shard whose full snapshot holds `n_users` users (1M takes ~3 min; building them through
    `apply` would take ~40). `templates` real users (per_user events each, applied like the live path) are
    snapshotted, then the snapshot is rewritten with n_users lines, line i being template i % templates under
    the id `syn-<i>` (in the line and in its state); the log stays (all of it older than the snapshot). The
    restart is timed (wall, CPU) with its RSS growth; 1,000 random users are read and checked against their
    template (same history and counts), then a full snapshot is written."""
    from llmrec.state.store import UserStateShard
    from llmrec.state.user_state import MeanVectorizer

    ids, vecs = _item_space()
    log = work / "events"
    shard = UserStateShard(0, str(log), None, snapshot_every=10**12, background=False)
    for batch in _events(templates, per_user, ids):
        shard.apply(batch)
    shard.snapshot()
    shard.close()
    del shard
    snap = log / "snapshot-s000.json"
    head, *lines = snap.read_text().splitlines()
    olds = [json.loads(line)["u"] for line in lines]
    t0 = time.perf_counter()
    tmp = snap.with_suffix(".tmp")
    with open(tmp, "w") as f:
        f.write(head + "\n")
        for i in range(n_users):
            k = i % len(lines)
            f.write(lines[k].replace(f'"{olds[k]}"', f'"syn-{i:08d}"') + "\n")
    os.replace(tmp, snap)
    write_s = time.perf_counter() - t0
    snap_bytes = snap.stat().st_size
    del lines
    _trim()
    rss0 = _rss()
    t1, c1 = time.perf_counter(), time.process_time()
    again = UserStateShard(0, str(log), lambda: MeanVectorizer(ids, vecs), background=False)
    restart_s, restart_cpu_s = time.perf_counter() - t1, time.process_time() - c1
    _trim()
    rss1 = _rss()
    n = again.stats()["n_users"]
    rng = np.random.default_rng(5)
    ref = UserStateShard(0, str(work / "ref"), None, snapshot_every=10**12, background=False)
    for batch in _events(templates, per_user, ids):
        ref.apply(batch)
    first = []
    for i in rng.integers(n_users, size=1000):
        t = time.perf_counter()
        got = again.get(f"syn-{int(i):08d}")
        first.append(time.perf_counter() - t)
        want = ref.get(olds[int(i) % len(olds)])
        if got is None or (got.n_events, got.history) != (want.n_events, want.history):
            raise AssertionError(f"syn-{int(i):08d} does not equal its template {olds[int(i) % len(olds)]}")
    ref.close()
    t2 = time.perf_counter()
    again.snapshot()
    snapshot_s = time.perf_counter() - t2
    again.close()
    return {"users": n_users, "users_loaded": n, "templates": templates, "events_per_user": per_user,
            "snapshot_bytes": snap_bytes, "snapshot_write_s": round(write_s, 1),
            "restart_s": round(restart_s, 2), "restart_cpu_s": round(restart_cpu_s, 2),
            "restart_rss_bytes_per_user": round((rss1 - rss0) / n_users),
            "restart_rss_gib": round((rss1 - rss0) / 2**30, 2),
            "first_get_ms": _pcts(first), "checked_users": len(first),
            "full_snapshot_after_restart_s": round(snapshot_s, 2)}


def measure_purge_pass(n_events: int, work: Path, n_gone: int = 100, per_user: int = 20) -> dict:
    from llmrec.state.event_log import EventLog, _rewrite_without
    from llmrec.state.user_state import Event

    rng = np.random.default_rng(0)
    n_users = max(1, n_events // per_user)
    src = work / "src"
    with EventLog(src, shard=0) as log:
        k = 0
        while k < n_events:
            size = int(rng.integers(1, 5))
            log.append([Event(event_id=f"e{k + j}", user_id=f"user-{(k + j) % n_users:07d}",
                              item_id=f"item{int(rng.integers(10_000))}", event="click", ts=1.7e9 + k + j)
                        for j in range(min(size, n_events - k))])
            k += size
    gone = {f"user-{u:07d}": None for u in rng.choice(n_users, size=min(n_gone, n_users), replace=False)}
    out: dict = {"log_events": n_events, "users_purged": len(gone),
                 "log_mb": round(sum(p.stat().st_size for p in src.glob("*.jsonl")) / 2**20, 1)}
    for name, fast in (("careful_s", False), ("pass_s", True)):
        dst = work / name
        shutil.copytree(src, dst)
        t = time.perf_counter()
        out[name.replace("_s", "_removed")] = _rewrite_without(dst, 0, gone, fast=fast)
        out[name] = round(time.perf_counter() - t, 3)
    out["speedup"] = round(out["careful_s"] / out["pass_s"], 1)
    shutil.rmtree(work, ignore_errors=True)
    return out


def measure_delete_latency(n_calls: int, work: Path, log_events: int = 0,
                           state_url: str | None = None) -> dict:
    import asyncio

    import ray

    from llmrec.raysetup import init_ray, local_env_defaults, ray_detail_to_log_files
    from llmrec.state.store import StateStore

    local_env_defaults()
    ray_detail_to_log_files()  # Ray Data's progress dumps to the session's log files
    init_ray(num_cpus=2, dashboard=False)
    store = StateStore(n_shards=1, log_dir=str(work / "lat-events"), name="bench-lat", namespace="bench",
                       snapshot_every=1000, state_url=state_url)
    try:
        for k in range(0, log_events, 1000):  # other users' events: the log every purge pass works on
            store.apply_sync([{"user_id": f"bg-{(k + j) // 10}", "item_id": f"i{j}", "event": "click",
                               "ts": 1.0 + j} for j in range(min(1000, log_events - k))])
        for k in range(0, 2000, 500):  # users the deleter can remove
            store.apply_sync([{"user_id": f"victim-{u}", "item_id": "i1", "event": "like", "ts": 1.0}
                              for u in range(k, k + 500)])

        def feedback_ms(tag: str) -> list[float]:
            async def run() -> list[float]:
                out = []
                for k in range(n_calls):
                    t = time.perf_counter()
                    await store.apply([{"user_id": f"fb-{k % 50}", "item_id": f"i{k}", "event": "click",
                                        "event_id": f"{tag}-{k}"}])
                    out.append((time.perf_counter() - t) * 1e3)
                return out

            return asyncio.run(run())

        idle = feedback_ms("idle")
        stop = threading.Event()
        n_del = [0]

        def deleter() -> None:
            k = 0
            while not stop.is_set():
                store.delete_sync(f"victim-{k}" if k < 2000 else f"nobody-{k}")
                k += 1
                n_del[0] = k

        t = threading.Thread(target=deleter)
        t.start()
        busy = feedback_ms("busy")
        stop.set()
        t.join()
        st = store.stats_sync()["shards"][0]
        phases = (("idle", idle), ("with_delete_loop", busy))
        pct = {name: {"p50_ms": round(float(np.percentile(v, 50)), 2),
                      "p99_ms": round(float(np.percentile(v, 99)), 2)} for name, v in phases}
        return {"calls": n_calls, "log_events_before": log_events,
                "backend": "redis" if state_url else "file", **pct,
                "deletes_during": n_del[0], "last_pass": st["last_snapshot"],
                "p99_ratio": round(pct["with_delete_loop"]["p99_ms"] / pct["idle"]["p99_ms"], 2),
                "purged_users": st["purged_users"], "full_snapshots": st["snapshots_written"]["full"],
                "purge_worker": st.get("purge_worker")}
    finally:
        store.shutdown(kill_all=True)
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, nargs="+", default=[100_000])
    p.add_argument("--events-per-user", type=int, default=20)
    p.add_argument("--tail", type=int, default=10_000, help="log events after the snapshot (recovery)")
    p.add_argument("--calls", type=int, default=1000, help="/feedback calls per latency phase")
    p.add_argument("--skip-latency", action="store_true")
    p.add_argument("--log-events", type=int, default=0,
                   help="events of other users in the log before the DELETE-loop latency phase")
    p.add_argument("--state-url", default=None,
                   help="run the latency phase on the Redis backend at this URL (an empty redis, e.g. "
                        "redis://127.0.0.1:6399/0?prefix=bench) instead of the file log")
    p.add_argument("--purge-events", type=int, nargs="*", default=[], metavar="EVENTS",
                   help="also time a purge pass over a log of this many events (e.g. 200000)")
    p.add_argument("--synthetic-restart", type=int, nargs="*", default=[], metavar="USERS",
                   help="also time a restart from a full snapshot of this many users, built from 2,000 "
                        "templates (e.g. 1000000)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="llmrec-bench-"))
    try:
        report: dict = {"memory_disk_recovery": [
            measure_memory_and_recovery(n, args.events_per_user, args.tail, work / f"n{n}")
            for n in args.users]}
        if args.synthetic_restart:
            report["synthetic_restart"] = [measure_synthetic_restart(n, work / f"syn{n}")
                                           for n in args.synthetic_restart]
        if args.purge_events:
            report["purge_pass"] = [measure_purge_pass(n, work / f"purge{n}") for n in args.purge_events]
        if not args.skip_latency:
            report["feedback_latency_under_delete_loop"] = measure_delete_latency(
                args.calls, work, args.log_events, args.state_url)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_json_report(report, args.out, indent=1, echo=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
