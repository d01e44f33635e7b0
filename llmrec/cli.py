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


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only `command`'s module is imported (none for `llmrec --help`), so startup stays cheap."""
    parser = argparse.ArgumentParser(prog="llmrec", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        mod = importlib.import_module(f"llmrec.commands.{name}") if command == name else None
        helptext = mod.HELP if mod else _SHORT_HELP[name]
        p = sub.add_parser(name, help=helptext, description=helptext)
        if mod is not None:
            mod.add_arguments(p)
            p.set_defaults(_run=mod.run)
    return parser


_SHORT_HELP = {
    "prepare": "convert a raw dataset into canonical items/interactions tables",
    "embed": "embed the item catalog with a BERT encoder on Ray Data",
    "index": "build a FAISS (or torch) index over item embeddings",
    "train": "train the scorer with Ray Train",
    "evaluate": "full-ranking evaluation against baselines",
    "recommend": "write top-k recommendations for listed users",
    "serve": "start the Ray Serve app",
    "replay": "replay test events through the online state update",
    "pipeline": "run every stage on one dataset into a run folder",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if a in COMMANDS), None)
    args = build_parser(command).parse_args(argv)
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
