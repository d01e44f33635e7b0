"""`llmrec serve`: start Ray, Serve's HTTP proxy on --host/--port and the llmrec app for a run folder.

`--train-in-background` (what `make serve` uses): serve at once, with the text user vector when the run has
no scorer yet, while a separate process trains one (`llmrec pipeline --stages train` on the run, with its own
local Ray; log in RUN/logs/train-background.log). When that succeeds and RUN/scorer changed, the app is
redeployed with the same args (new replicas start before the old ones stop, so answers never pause) and picks
the scorer by the usual rule (`RUN/eval`, when present, must rate it above the zero-shot text model).

Stopping: Ctrl-C and SIGTERM (`kill`, `docker stop`, a Kubernetes pod's stop) take the same path: the
background training gets Ctrl-C (and is terminated if it does not stop), the app is deleted and Ray shut down.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from llmrec import schema
from llmrec.config import ServeConfig, add_config_arguments, config_from_args
from llmrec.serve.auth import ARGV_REFUSED, TOKEN_ENV, read_token
from llmrec.storage import Arg, In, LocalOnly, Run, is_uri, redact

logger = logging.getLogger(__name__)

HELP = "serve recommendations over HTTP (Ray Serve): /recommend, /feedback, /users/{id}, /healthz, /docs"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run folder (RUN/embeddings, RUN/index, optional RUN/scorer)")
    # every serving option (--host, --port, --shards, --replicas, ...) is a field of ServeConfig: one flag per
    # field, with the field's default and help (llmrec/config.py); the paths below, the token file included,
    # stay plain flags (no secret is ever a config field)
    add_config_arguments(p, ServeConfig)
    p.add_argument(
        "--auth-token-file",
        default=None,
        help=f"file holding the bearer token every route except /healthz requires (default: ${TOKEN_ENV} if "
        "set, else no auth)",
    )
    p.add_argument("--auth-token", default=None, help=argparse.SUPPRESS)  # refused: see llmrec.serve.auth
    p.add_argument(
        "--events",
        default=None,
        help="local folder of the serving event log (default RUN/events; required when --run is a URI)",
    )
    p.add_argument("--address", default=None,
                   help="join a running Ray cluster (default: start a new local one, even if `ray start` "
                        "ran)")


EVENTS_LOCAL = "the event log is appended and fsync'd before each /feedback reply, which needs a local disk"


def storage_args(args: argparse.Namespace) -> dict[str, Arg]:
    """Flags that may be URIs (llmrec.cli stages them): a run URI is read-only here, so --events is needed."""
    if is_uri(args.run) and getattr(args, "train_in_background", False):
        raise ValueError(
            f"--train-in-background needs a local --run folder (it writes RUN/scorer), got {redact(args.run)}"
        )
    if is_uri(args.run) and not args.events:
        raise ValueError(
            f"--run {redact(args.run)} is a URI (staged to a local read-only cache); pass --events DIR, a "
            f"local folder for the serving event log ({EVENTS_LOCAL})"
        )
    parts = (schema.RUN_DATA, schema.RUN_EMBEDDINGS, schema.RUN_INDEX, schema.RUN_SCORER, schema.RUN_EVAL)
    return {"run": Run(parts), "model": In(), "events": LocalOnly(EVENTS_LOCAL)}


STATE_URL_ENV = "LLMREC_STATE_URL"


def _state_env(backend: str) -> str | None:
    if backend != "redis":
        return None
    if not os.environ.get(STATE_URL_ENV):
        raise ValueError(f"--state-backend redis needs ${STATE_URL_ENV} (redis://[:password@]host:port/db)")
    return STATE_URL_ENV


def run(args: argparse.Namespace) -> int:
    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions
    from ray.serve.schema import LoggingConfig

    from llmrec.raysetup import init_ray
    from llmrec.serve.app import build_app

    cfg = config_from_args(ServeConfig, args)  # checks --port, --shards, ... before Ray starts
    if args.auth_token:
        raise ValueError(ARGV_REFUSED)
    token = read_token(args.auth_token_file, os.environ)
    train_argv = background_training_argv(args.run) if cfg.train_in_background else None
    app_args = {
        **cfg.app_args(),
        "run_dir": args.run,
        "auth_token": token,
        "log_dir": str(Path(args.events).resolve()) if args.events else None,
        "state_url_env": _state_env(cfg.state_backend),
    }
    app = build_app(app_args)
    init_ray(address=args.address)
    trainer: _BackgroundTraining | None = None
    t0 = time.perf_counter()
    # access logs off: every request line would otherwise be streamed to this terminal (PLATFORM G6)
    serve.start(
        http_options=HTTPOptions(host=cfg.host, port=cfg.port),
        logging_config=LoggingConfig(enable_access_log=False),
    )
    with sigterm_as_interrupt():  # `kill`, `docker stop`: the Ctrl-C path below, trainer included
        try:  # Ctrl-C while serve.run still waits for the app (requests may already be served) stops cleanly
            serve.run(app, name="llmrec", route_prefix="/",
                      logging_config=LoggingConfig(enable_access_log=False))
            url = f"http://{cfg.host}:{cfg.port}"
            auth = f" -H \"Authorization: Bearer ${TOKEN_ENV}\"" if token else ""  # never the token itself
            logger.info(
                "llmrec serving %s at %s (ready in %.1fs); API docs at %s/docs",
                args.run,
                url,
                time.perf_counter() - t0,
                url,
            )
            logger.info("try: curl%s '%s/recommend?user_id=alice&k=5'", auth, url)
            logger.info(
                "     curl -X POST %s/feedback%s -H 'Content-Type: application/json' "
                '-d \'{"user_id": "alice", "item_id": "<an item id>", "event": "like"}\'',
                url,
                auth,
            )
            if train_argv is not None:
                trainer = _BackgroundTraining(train_argv, Path(args.run))
            while True:
                time.sleep(5.0 if trainer is not None else 3600.0)
                if trainer is not None and trainer.finished():
                    if trainer.scorer_changed():
                        t1 = time.perf_counter()
                        logger.info("redeploying the app so that it picks up the new scorer")
                        serve.run(
                            build_app(app_args),
                            name="llmrec",
                            route_prefix="/",
                            logging_config=LoggingConfig(enable_access_log=False),
                        )
                        logger.info("app redeployed in %.1fs; /admin/stats shows which user model serves",
                                    time.perf_counter() - t1)
                    trainer = None
        except KeyboardInterrupt:
            if trainer is not None:
                trainer.stop()
            logger.info("stopping: Serve app deleted; state shards stay (their log is in RUN/events)")
            serve.delete("llmrec")
            serve.shutdown()
            ray.shutdown()
    return 0


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block the first SIGTERM raises KeyboardInterrupt in the main thread, so `kill`, `docker
    stop` and a pod's stop run the same cleanup as Ctrl-C (without it Python dies at once and a background
    training process lives on, orphaned, with its own Ray); further SIGTERMs are ignored while that cleanup
    runs (SIGKILL still ends it). The previous handler is restored on exit. Main thread only (Python's rule
    for signal handlers)."""
    received = False

    def _interrupt(signum: int, frame: object) -> None:
        nonlocal received
        if received:
            logger.info("SIGTERM again: still stopping")
            return
        received = True
        logger.info("SIGTERM: stopping as on Ctrl-C")
        raise KeyboardInterrupt("SIGTERM")

    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


TRAIN_LOG = "logs/train-background.log"  # under the run folder


def background_training_argv(run: str) -> list[str]:
    """The command that trains RUN/scorer beside the serving app: `llmrec pipeline --stages train` with the
    dataset and source that RUN/data/meta.json records (so pipeline.json knows the scorer and a later
    `llmrec pipeline` reuses it).

    Raises:
        ValueError: the run is a URI (training writes RUN/scorer on this disk) or has no prepared data.
    """
    if is_uri(run):
        raise ValueError(
            f"--train-in-background needs a local --run folder (it writes RUN/scorer), got {redact(run)}"
        )
    meta_path = Path(run) / schema.RUN_DATA / schema.META_FILE
    if not meta_path.is_file():
        raise ValueError(
            f"--train-in-background trains from {meta_path.parent}, which has no meta.json; run "
            "`llmrec pipeline --stages prepare,embed,index` first (as `make serve` does)"
        )
    meta = json.loads(meta_path.read_text())
    return [sys.executable, "-m", "llmrec", "pipeline", "--dataset", str(meta["dataset"]), "--source",
            str(meta["source"]), "--out", str(run), "--stages", "train"]


class _BackgroundTraining:
    """`argv` in its own process (its own local Ray: RAY_ADDRESS is not passed on), output to RUN/logs."""

    def __init__(self, argv: list[str], run: Path) -> None:
        self.run = run
        self.scorer_meta = run / schema.RUN_SCORER / schema.META_FILE
        self.before = self._scorer_bytes()
        log = run / TRAIN_LOG
        log.parent.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        self.t0 = time.perf_counter()
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
        logger.info(
            "training the scorer in the background (pid %d, log %s); until it is ready the app serves %s",
            self.proc.pid,
            log,
            "the current RUN/scorer" if self.before else "the text user vector",
        )

    def _scorer_bytes(self) -> bytes | None:
        return self.scorer_meta.read_bytes() if self.scorer_meta.is_file() else None

    def finished(self) -> bool:
        rc = self.proc.poll()
        if rc is None:
            return False
        dt = time.perf_counter() - self.t0
        if rc == 0:
            logger.info("background training finished in %.0fs", dt)
        else:
            logger.error(
                "background training failed (exit %d) after %.0fs; still serving as before; see %s",
                rc, dt, self.run / TRAIN_LOG,
            )
        return True

    def scorer_changed(self) -> bool:
        return self.proc.returncode == 0 and self._scorer_bytes() not in (None, self.before)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Ctrl-C for the trainer too (its driver shuts its own Ray down), then terminate if it hangs."""
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            self.proc.wait(timeout=timeout_s)
        logger.info("background training stopped (exit %s)", self.proc.returncode)
