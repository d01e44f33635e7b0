"""`llmrec forget`: remove one user's events from copies of the serving event log that no server writes.

The live service forgets through `DELETE /users?user_id=...` (the state shards purge their log, snapshot and
write a tombstone). Copies outside it are what this command reaches: event-log folders that no live shard
writes (a stopped server's RUN/events, a restored backup, a synced copy brought back to disk) and the copies
of event logs in the artifact cache (`llmrec train --events URI` stages them there). In a log folder it also
writes a tombstone, so that a server started on it never loads the user's base history again. What else keeps
a copy, and for how long: README, "Privacy".
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

HELP = "remove a user's events from stopped event-log folders and from cached copies of event logs"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--user", required=True, help="the user id to forget")
    p.add_argument("--events", action="append", default=[],
                   help="an event-log folder no server writes now (repeat for several)")
    p.add_argument("--no-cache", action="store_true",
                   help="leave the artifact cache ($LLMREC_CACHE_DIR, ~/.cache/llmrec/artifacts) alone")


def run(args: argparse.Namespace) -> int:
    from llmrec import storage
    from llmrec.schema import META_FILE
    from llmrec.state.backends import FileBackend
    from llmrec.state.event_log import forget_user, segment_paths
    from llmrec.state.privacy import UserKeyer
    from llmrec.state.snapshots import remove_user
    from llmrec.state.store import shard_of
    from llmrec.state.tombstones import Tombstones

    if not args.user:
        raise ValueError("--user must be a non-empty user id")
    report: dict[str, dict[str, int]] = {"folders": {}, "cache_copies": {}}
    for d in args.events:
        folder = Path(d)
        meta_path = folder / META_FILE
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        if meta.get("stage") != "events":
            raise ValueError(f"{folder} is not a serving event log (no meta.json with stage 'events')")
        _refuse_if_live(folder)
        report["folders"][str(folder)] = forget_user(folder, args.user)
        n_shards = int(meta["n_shards"])
        sh = shard_of(args.user, n_shards)
        last = max([0] + [first for s, first, _p in segment_paths(folder, sh) if s == sh])
        files = FileBackend(folder, sh)
        tomb = Tombstones(files, UserKeyer(files.hash_key()))
        tomb.mark_purged(tomb.add(args.user, _last_seq(folder, sh, last)))
        report["folders"][str(folder)] += remove_user(folder, sh, args.user)  # its state in snapshot files
    if not args.no_cache:
        root = storage.default_cache_root(os.environ)
        for meta_path in sorted(root.glob(f"*/*/{META_FILE}")) if root.is_dir() else []:
            try:
                stage = json.loads(meta_path.read_text()).get("stage")
            except (OSError, ValueError):
                continue
            if stage == "events":
                report["cache_copies"][str(meta_path.parent)] = forget_user(meta_path.parent, args.user)
    print(json.dumps(report, indent=1))
    return 0


def _refuse_if_live(folder: Path) -> None:
    for lock in folder.glob("s*.lock"):
        with open(lock, "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(f, fcntl.LOCK_UN)
            except BlockingIOError:
                raise ValueError(f"a live state shard writes {folder} ({lock.name} is locked); forget the "
                                 "user "
                                 "through that server: DELETE /users?user_id=...") from None


def _last_seq(folder: Path, shard: int, first_of_last: int) -> int:
    from llmrec.state.event_log import iter_events

    return max([first_of_last - 1] + [r["seq"] for r in iter_events(folder, shard=shard,
                                                                   after_seq=max(0, first_of_last - 1))])
