"""`llmrec` command line: one subcommand per stage, each in llmrec/commands/<name>.py (`-` in a name is `_`).

Each command module defines `HELP: str`, `add_arguments(parser) -> None` and `run(args) -> int`, and keeps
heavy imports (torch, ray, faiss) inside `run` so that `llmrec --help` stays fast. A command whose flags name
artifact folders also defines `storage_args(args) -> {flag dest: llmrec.storage.In | Run | Out | ...}`: any
such flag may then be a URI (s3://, gs://, file://, memory://, ...), staged to local disk around `run` here
(cache: $LLMREC_CACHE_DIR, default ~/.cache/llmrec/artifacts), so `run` only ever sees local paths.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from llmrec import __version__, storage
from llmrec.device import FaissConflictError
from llmrec.log import setup_logging
from llmrec.optional import MissingExtraError
from llmrec.raysetup import local_env_defaults, ray_detail_to_log_files

COMMANDS = ("prepare", "embed", "tune-encoder", "index", "train", "evaluate", "recommend", "serve", "replay",
            "learn", "pipeline", "forget")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmrec", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"llmrec {__version__}")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        mod = importlib.import_module(f"llmrec.commands.{name.replace('-', '_')}")
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run, _storage=getattr(mod, "storage_args", None))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    local_env_defaults()
    ray_detail_to_log_files()  # a person reads this terminal: Ray's progress dumps go to its log files
    setup_logging(args.log_level)
    try:
        return _run_localized(args)
    # user errors and a missing/conflicting optional package: one clear line, no traceback
    except (ValueError, FileNotFoundError, MissingExtraError, FaissConflictError) as e:
        if args.log_level.upper() == "DEBUG":
            raise
        print(f"llmrec {args.command}: error: {e}", file=sys.stderr)
        return 2


class _CommandFailed(Exception):
    def __init__(self, rc: int) -> None:
        self.rc = rc


def _run_localized(args: argparse.Namespace) -> int:
    """Run the command; URIs among its declared artifact flags are staged in and out around it."""
    spec = args._storage(args) if args._storage else {}
    if not any(storage.is_uri(getattr(args, name, None)) for name in spec):
        return int(args._run(args) or 0)
    try:
        with storage.localize(vars(args), spec, storage.default_cache_root(os.environ)) as local:
            rc = int(args._run(argparse.Namespace(**local)) or 0)
            if rc != 0:
                raise _CommandFailed(rc)  # leaves the with block by an exception: nothing is uploaded
    except _CommandFailed as e:
        return e.rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
