"""`llmrec` command line: one subcommand per stage, each in llmrec/commands/<name>.py.

Each command module defines `HELP: str`, `add_arguments(parser) -> None` and `run(args) -> int`, and keeps
heavy imports (torch, ray, faiss) inside `run` so that `llmrec --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from llmrec.log import setup_logging
from llmrec.raysetup import local_env_defaults

COMMANDS = ("prepare", "embed", "index", "train", "evaluate", "recommend", "serve", "replay", "pipeline")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmrec", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        mod = importlib.import_module(f"llmrec.commands.{name}")
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    local_env_defaults()
    setup_logging(args.log_level)
    try:
        return int(args._run(args) or 0)
    except (ValueError, FileNotFoundError) as e:  # user errors: one clear line, no traceback
        if args.log_level.upper() == "DEBUG":
            raise
        print(f"llmrec {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
