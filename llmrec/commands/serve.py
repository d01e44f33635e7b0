"""`llmrec serve`: start Ray, Serve's HTTP proxy on --host/--port and the llmrec app for a run folder."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from llmrec import schema
from llmrec.storage import Arg, In, LocalOnly, Run, is_uri, redact

logger = logging.getLogger(__name__)

HELP = "serve recommendations over HTTP (Ray Serve): /recommend, /feedback, /users/{id}, /healthz, /docs"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run folder (RUN/embeddings, RUN/index, optional RUN/scorer)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP host (default 127.0.0.1; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--shards", type=int, default=4, help="user-state shard actors (default 4)")
    p.add_argument(
        "--auth-token", default=None, help="bearer token required for /feedback, DELETE and /admin"
    )
    p.add_argument("--replicas", type=int, default=1, help="replicas per deployment (default 1)")
    p.add_argument(
        "--model", default=None, help="text encoder for q and text feedback (default: the embeddings' model)"
    )
    p.add_argument(
        "--events",
        default=None,
        help="local folder of the serving event log (default RUN/events; required when --run is a URI)",
    )
    p.add_argument("--log-user-ids", action="store_true", help="log user ids in clear (default: hashed)")
    p.add_argument(
        "--no-run-users",
        action="store_true",
        help="start the state shards empty instead of from the users of RUN/data/interactions.parquet",
    )
    p.add_argument("--address", default=None, help="join a running Ray cluster (default: start a local one)")


EVENTS_LOCAL = "the event log is appended and fsync'd before each /feedback reply, which needs a local disk"


def storage_args(args: argparse.Namespace) -> dict[str, Arg]:
    """Flags that may be URIs (llmrec.cli stages them): a run URI is read-only here, so --events is needed."""
    if is_uri(args.run) and not args.events:
        raise ValueError(
            f"--run {redact(args.run)} is a URI (staged to a local read-only cache); pass --events DIR, a "
            f"local folder for the serving event log ({EVENTS_LOCAL})"
        )
    parts = (schema.RUN_DATA, schema.RUN_EMBEDDINGS, schema.RUN_INDEX, schema.RUN_SCORER, schema.RUN_EVAL)
    return {"run": Run(parts), "model": In(), "events": LocalOnly(EVENTS_LOCAL)}


def run(args: argparse.Namespace) -> int:
    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions
    from ray.serve.schema import LoggingConfig

    from llmrec.raysetup import init_ray
    from llmrec.serve.app import build_app

    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port must be within 1..65535, got {args.port}")
    app = build_app(
        {
            "run_dir": args.run,
            "n_shards": args.shards,
            "auth_token": args.auth_token,
            "num_replicas": args.replicas,
            "model": args.model,
            "log_user_ids": args.log_user_ids,
            "load_run_users": not args.no_run_users,
            "log_dir": str(Path(args.events).resolve()) if args.events else None,
        }
    )
    init_ray(address=args.address)
    t0 = time.perf_counter()
    # access logs off: every request line would otherwise be streamed to this terminal (PLATFORM G6)
    serve.start(
        http_options=HTTPOptions(host=args.host, port=args.port),
        logging_config=LoggingConfig(enable_access_log=False),
    )
    try:  # Ctrl-C while serve.run still waits for the app (requests may already be served) stops cleanly too
        serve.run(app, name="llmrec", route_prefix="/", logging_config=LoggingConfig(enable_access_log=False))
        url = f"http://{args.host}:{args.port}"
        auth = f" -H 'Authorization: Bearer {args.auth_token}'" if args.auth_token else ""
        logger.info(
            "llmrec serving %s at %s (ready in %.1fs); API docs at %s/docs",
            args.run,
            url,
            time.perf_counter() - t0,
            url,
        )
        logger.info("try: curl '%s/recommend?user_id=alice&k=5'", url)
        logger.info(
            "     curl -X POST %s/feedback%s -H 'Content-Type: application/json' "
            '-d \'{"user_id": "alice", "item_id": "<an item id>", "event": "like"}\'',
            url,
            auth,
        )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        logger.info("stopping: Serve app deleted; state shards stay (their log is in RUN/events)")
        serve.delete("llmrec")
        serve.shutdown()
        ray.shutdown()
    return 0
