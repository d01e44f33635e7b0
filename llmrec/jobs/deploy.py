"""Job: deploy the llmrec Serve app onto the cluster it runs in, from a Serve config file and a run folder.

It reads one application from the Serve config (default `cluster/serve.yaml`, the file `serve deploy` takes),
overrides its `args` with `--run RUN` (the run folder the app serves: index, scorer, events) and `--set
key=value`, builds the app with the config's `import_path` builder (`llmrec.serve.app:build_app(args)`) and
`serve.run`s it without blocking. The Serve controller is detached, so the app keeps serving after this job
exits; redeploying the same `--app` name updates it in place. It also prints the equivalent declarative
command; `--hint` prints only that::

    ray job submit --address http://127.0.0.1:8265 --runtime-env cluster/runtime_env.yaml -- \\
        python -m jobs.deploy --run /mnt/runs/ml

    # declarative (the production path; applies per-deployment settings such as num_replicas):
    serve deploy cluster/serve.yaml --address http://127.0.0.1:8265

`--http-host/--http-port` only matter when Serve is not running yet on the cluster (they start its proxy);
the defaults come from the config's `http_options`, else 127.0.0.1:8000.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger(__name__)

DEFAULT_SERVE_CONFIG = "cluster/serve.yaml"
RUN_ARG = "run_dir"  # the llmrec.serve.app:build_app arg that names the run folder


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.deploy", description=__doc__.splitlines()[0])
    p.add_argument("--run", default=None, help=f"run folder the app serves (sets args.{RUN_ARG})")
    p.add_argument("--serve-config", default=DEFAULT_SERVE_CONFIG,
                   help=f"Serve config YAML, as for `serve deploy` (default {DEFAULT_SERVE_CONFIG})")
    p.add_argument("--app", default=None, help="application name in the config (default: its only/first one)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one application arg; VALUE is read as YAML (repeatable)")
    p.add_argument("--http-host", default=None, help="Serve proxy host if Serve is not running yet")
    p.add_argument("--http-port", type=int, default=None, help="Serve proxy port if Serve is not running yet")
    p.add_argument("--address", default=None,
                   help="Ray address (default: $RAY_ADDRESS, which ray job submit sets)")
    p.add_argument("--hint", action="store_true", help="only print the `serve deploy` command and exit")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")
    return p


def load_app_config(path: str | Path, app: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return (whole serve config, the chosen application entry).

    Raises:
        FileNotFoundError: no such config file.
        ValueError: not a Serve config, or `app` is not one of its applications.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"serve config {p} not found (cwd {Path.cwd()}); pass --serve-config FILE")
    cfg = yaml.safe_load(p.read_text()) or {}
    apps = cfg.get("applications") if isinstance(cfg, dict) else None
    if not isinstance(apps, list) or not apps:
        raise ValueError(f"{p}: expected a Serve config with a non-empty `applications:` list")
    names = [a.get("name", "default") for a in apps]
    if app is None:
        return cfg, apps[0]
    if app not in names:
        raise ValueError(f"--app {app!r} is not in {p}; its applications are {names}")
    return cfg, apps[names.index(app)]


def app_args(entry: dict[str, Any], run: str | None, overrides: list[str]) -> dict[str, Any]:
    """The application's `args` with `--run` and `--set KEY=VALUE` (YAML-typed) applied."""
    args = dict(entry.get("args") or {})
    if run is not None:
        args[RUN_ARG] = str(Path(run).resolve())
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        args[key] = yaml.safe_load(value)
    return args


def deploy_hint(serve_config: str, entry: dict[str, Any], args: dict[str, Any]) -> str:
    address = os.environ.get("RAY_DASHBOARD_ADDRESS", "http://127.0.0.1:8265")
    lines = [f"serve deploy {shlex.quote(serve_config)} --address {address}"]
    if args != (entry.get("args") or {}):
        name = entry.get("name", "default")
        lines.append(f"  (first set application {name!r} args in {serve_config} to {args})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Deploy (or with --hint just describe) the Serve app; returns 0, or 2 on bad input."""
    try:
        opts = build_parser().parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 0
    from llmrec.log import setup_logging
    from llmrec.raysetup import local_env_defaults, ray_detail_to_log_files
    from llmrec.storage import is_uri

    setup_logging(opts.log_level)
    try:
        cfg, entry = load_app_config(opts.serve_config, opts.app)
        args = app_args(entry, opts.run, opts.set)
        if opts.run is not None and is_uri(opts.run):
            raise ValueError(
                f"--run {opts.run}: a URI; Serve replicas read the run folder from disk on their node, so "
                "copy it to a shared mount (or use `llmrec serve --run URI --events DIR` on one machine)"
            )
        if opts.run is not None and not Path(opts.run).is_dir():
            raise FileNotFoundError(
                f"--run {opts.run}: no such run folder; run `python -m jobs.pipeline` first"
            )
    except (ValueError, FileNotFoundError) as e:
        print(f"jobs deploy: error: {e}", file=sys.stderr)
        return 2
    hint = deploy_hint(opts.serve_config, entry, args)
    if opts.hint:
        print(hint)
        return 0
    local_env_defaults()
    ray_detail_to_log_files()
    return _deploy(cfg, entry, args, opts, hint)


def _deploy(cfg: dict[str, Any], entry: dict[str, Any], args: dict[str, Any], opts: argparse.Namespace,
            hint: str) -> int:
    from ray import serve
    from ray.serve import Application

    from llmrec.raysetup import init_ray

    name = entry.get("name", "default")
    route_prefix = entry.get("route_prefix", "/")
    module_name, _, attr = entry["import_path"].partition(":")
    target = getattr(importlib.import_module(module_name), attr)
    try:
        app = target if isinstance(target, Application) else target(args)
    except ValueError as e:  # the builder validates its args (unknown key, missing artifacts)
        print(f"jobs deploy: error: {entry['import_path']}: {e}", file=sys.stderr)
        return 2
    if not isinstance(app, Application):
        print(f"jobs deploy: error: {entry['import_path']} returned {type(app).__name__}, expected a Serve "
              "Application", file=sys.stderr)
        return 2
    http = dict(cfg.get("http_options") or {})
    host = opts.http_host or http.get("host", "127.0.0.1")
    port = opts.http_port or int(http.get("port", 8000))
    init_ray(opts.address)
    t0 = time.perf_counter()
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name=name, route_prefix=route_prefix, blocking=False)
    status = serve.status().applications[name].status
    logger.info("deployed application %r (%s) in %.1fs at http://%s:%d%s", name, status,
                time.perf_counter() - t0, host, port, route_prefix or "")
    print(f"application {name!r} {status} at http://{host}:{port}{route_prefix or ''}\n"
          f"declarative equivalent:\n  {hint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
