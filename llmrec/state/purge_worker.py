"""A child process that runs a shard's log purges, so that their CPU work leaves the shard's GIL.

A delete's log purge reads the whole log of the shard to find the deleted users' records: for the file log a
pattern scan of every closed segment and a rewrite of those that hold them (`event_log._rewrite_without`),
0.2-0.5 s per pass over 200,000 events on this project's 2-core machine; for Redis a read of the whole stream
and an XDEL (`RedisBackend.forget_here`). Run in a thread of the shard actor, that work shares the actor's
GIL with the requests, and under a client that loops DELETE it set the `/feedback` p99 (README, issue 15).
Here each log starts one child (`python -m llmrec.state.purge_worker`) on its first purge and sends it jobs
over a pipe; the calling thread waits on the pipe (without the GIL) for the answer.

The protocol is one JSON line per job on the child's stdin, the log's target (`{"kind": "file", "dir"}` or
`{"kind": "redis", "url"}`; a Redis URL with its password travels on the pipe, never in argv) plus `shard`,
`users` and `max_first_seq`, and one JSON line per answer on its stdout: `{"removed": n}` or
`{"error": kind, "message", "errno", "retry_after_s"}`. The child exits when its stdin closes (the log
closed, or the shard process died). A file segment is only ever rewritten under the shard's purge lock
(`_rewrite_without` takes it), so a child left running by a killed shard and a restarted shard never rewrite
the same segment at once; an XDEL is idempotent.

If the child cannot be started, or dies during a job, the job runs in the calling process (`run_job`, the
function the child runs: each file segment is replaced atomically, so a half-done job is only redone) and
the next job starts a new child; `stats()` counts both.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from llmrec.state.errors import LogCorruption, StateUnavailable

logger = logging.getLogger(__name__)

# seconds `close` waits for the child to finish its job and exit before it kills it
_CLOSE_TIMEOUT_S = 10.0


class PurgeWorker:
    """The child process of one log's purges (started on the first job, reused after).

    `target`: `{"kind": "file", "dir": log folder}` or `{"kind": "redis", "url": redis URL}`.
    `forget(shard, users, max_first_seq)` has the contract of the backend's own purge (returns how many
    records went; raises OSError with the child's errno, LogCorruption, or StateUnavailable)."""

    def __init__(self, target: Mapping[str, Any]) -> None:
        if target.get("kind") not in ("file", "redis"):
            raise ValueError(f"target kind must be 'file' or 'redis', got {target.get('kind')!r}")
        self.target = dict(target)
        self._where = str(target.get("dir") or "a redis log")  # never the URL (it may hold a password)
        self._proc: subprocess.Popen[bytes] | None = None
        self._mu = threading.Lock()  # one job at a time on the pipe
        self.jobs = 0  # jobs the child answered
        self.in_process = 0  # jobs run in the calling process (no child, or it died)
        self.starts = 0

    @property
    def pid(self) -> int | None:
        """The live child's pid (None before the first job or after it died)."""
        p = self._proc
        return p.pid if p is not None and p.poll() is None else None

    def stats(self) -> dict[str, Any]:
        return {"pid": self.pid, "jobs": self.jobs, "in_process": self.in_process, "starts": self.starts}

    def forget(self, shard: int, users: Mapping[str, int | None], max_first_seq: int | None = None) -> int:
        job = {**self.target, "shard": shard, "users": dict(users), "max_first_seq": max_first_seq}
        with self._mu:
            reply = self._ask(json.dumps(job).encode("ascii") + b"\n")
            if reply is None:  # no child: the work runs here, as it did before the child existed
                self.in_process += 1
                return run_job(job)
            self.jobs += 1
        if "error" not in reply:
            return int(reply["removed"])
        msg = f"log purge in the purge worker: {reply['message']}"
        if reply["error"] == "LogCorruption":
            raise LogCorruption(msg)
        if reply["error"] in ("StateUnavailable", "LogWriteError"):
            raise StateUnavailable(msg, retry_after_s=float(reply.get("retry_after_s") or 1.0))
        if reply.get("errno") is not None:
            raise OSError(int(reply["errno"]), msg)
        raise RuntimeError(f"{reply['error']}: {msg}")

    def close(self) -> None:
        """Close the child's stdin and wait for it to exit (it finishes the job it runs first)."""
        with self._mu:
            self._stop(kill=False)

    def _ask(self, job: bytes) -> dict[str, Any] | None:
        proc = self._proc if self._proc is not None and self._proc.poll() is None else self._start()
        if proc is None:
            return None
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(job)
            proc.stdin.flush()
            line = proc.stdout.readline()
        except OSError:
            line = b""
        if not line:
            logger.warning("log purge worker (pid %d) of %s died during a job (exit %s); the job runs in "
                           "the shard, the next one starts a new worker", proc.pid, self._where, proc.poll())
            self._stop(kill=True)
            return None
        return json.loads(line)

    def _start(self) -> subprocess.Popen[bytes] | None:
        self._stop(kill=True)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "llmrec.state.purge_worker"], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, env=_child_env(), close_fds=True)
        except OSError as e:
            logger.warning("cannot start the log purge worker of %s (%s: %s); purges run in the shard",
                           self._where, type(e).__name__, e)
            self._proc = None
            return None
        self.starts += 1
        return self._proc

    def _stop(self, kill: bool) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        _close_quietly(proc.stdin)  # the child exits on this EOF once its job is answered
        if kill:
            proc.kill()
        try:
            proc.wait(timeout=_CLOSE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        _close_quietly(proc.stdout)


def _child_env() -> dict[str, str]:
    """The parent's environment, with this checkout importable (`-m` must find llmrec wherever the parent
    imported it from) and numpy's thread pools at one thread (the scan is single-threaded)."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _close_quietly(f: IO[bytes] | None) -> None:
    if f is None:
        return
    try:
        f.close()
    except OSError:
        pass


def run_job(job: Mapping[str, Any]) -> int:
    """One purge job (see the module docstring): how many records went."""
    if job["kind"] == "file":
        from llmrec.state.event_log import _rewrite_without

        return _rewrite_without(Path(job["dir"]), int(job["shard"]), job["users"],
                                max_first_seq=job["max_first_seq"])
    from llmrec.state.backends import RedisBackend

    backend = RedisBackend(job["url"], int(job["shard"]))
    try:
        return backend.forget_here(job["users"])
    finally:
        backend.r.close()


def main() -> int:
    out = sys.stdout.buffer
    sys.stdout = sys.stderr  # stdout carries the answers only: anything printed goes to the shard's log
    for line in sys.stdin.buffer:
        job = json.loads(line)
        try:
            reply: dict[str, Any] = {"removed": run_job(job)}
        except Exception as e:  # answered, so the shard raises it where it would have run the job itself
            reply = {"error": type(e).__name__, "message": str(e), "errno": getattr(e, "errno", None),
                     "retry_after_s": getattr(e, "retry_after_s", None)}
        out.write(json.dumps(reply).encode("ascii") + b"\n")
        out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
