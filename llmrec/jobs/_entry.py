"""Shared plumbing for the `python -m jobs.<name>` entrypoints (the thin `ray job submit` wrappers).

Every job is `main(argv) -> int` that runs one `llmrec` CLI subcommand with the same flags, so a job and
`llmrec <command>` are interchangeable. On top of the CLI flags a job accepts `--config FILE.yaml` (see
cluster/jobs/*.yaml): a YAML mapping from flag name (without `--`, `_` or `-`) to value, expanded into CLI
flags *before* the command-line ones so that `--key value` on the command line still wins (argparse keeps
the last value). Values: a scalar -> `--key value`; `true` -> `--key` (store_true flag); `false` ->
`--no-key` when the command has that flag (a switch that is on by default, e.g. `warm-start: false`), else
omitted; null -> omitted; a list -> `--key v1 v2 ...`.

Inside `ray job submit` the driver finds the cluster through $RAY_ADDRESS (set by the job manager), which
`llmrec.raysetup.init_ray` honours, so no `--address` is needed there.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CONFIG_FLAG = "--config"


def config_to_argv(
    config: dict[str, Any], source: str = "<config>", negatable: frozenset[str] = frozenset()
) -> list[str]:
    """Expand a `{flag: value}` mapping into CLI argv (see the module docstring for the rules).

    negatable: the command's `--no-x` flags (a `false` value for `x` becomes `--no-x`).

    Raises:
        ValueError: a key is not a non-empty string or a value is a nested mapping.
    """
    argv: list[str] = []
    for key, value in config.items():
        if not isinstance(key, str) or not key.strip("-_ "):
            raise ValueError(f"{source}: config keys must be flag names like 'batch-size', got {key!r}")
        flag = "--" + key.strip().lstrip("-").replace("_", "-")
        if isinstance(value, dict):
            raise ValueError(
                f"{source}: value of {key!r} is a mapping {value!r}; expected a scalar, a list or true/false "
                "(the config is one flat mapping of CLI flags)"
            )
        if value is False and "--no-" + flag[2:] in negatable:
            argv.append("--no-" + flag[2:])
            continue
        if value is None or value is False:
            continue
        if value is True:
            argv.append(flag)
        elif isinstance(value, (list, tuple)):
            argv += [flag, *(str(v) for v in value)]
        else:
            argv += [flag, str(value)]
    return argv


def expand_config(argv: list[str], negatable: frozenset[str] = frozenset()) -> list[str]:
    """Replace every `--config FILE` / `--config=FILE` in argv by the flags in FILE (placed first).

    Raises:
        ValueError: `--config` without a file, or a file that is not a YAML mapping.
        FileNotFoundError: the config file does not exist.
    """
    import yaml

    rest: list[str] = []
    from_files: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == CONFIG_FLAG or a.startswith(CONFIG_FLAG + "="):
            if a == CONFIG_FLAG:
                if i + 1 >= len(argv):
                    raise ValueError("--config needs a file: --config cluster/jobs/<name>.yaml")
                path, i = argv[i + 1], i + 2
            else:
                path, i = a.split("=", 1)[1], i + 1
            p = Path(path)
            if not p.is_file():
                raise FileNotFoundError(f"--config {path}: no such file (cwd {Path.cwd()})")
            data = yaml.safe_load(p.read_text()) or {}
            if not isinstance(data, dict):
                raise ValueError(
                    f"--config {path}: expected a YAML mapping of flag: value, got {type(data).__name__}"
                )
            from_files += config_to_argv(data, source=path, negatable=negatable)
        else:
            rest.append(a)
            i += 1
    return from_files + rest


def run_command(command: str, argv: list[str] | None = None) -> int:
    """Run `llmrec <command> *argv` in this process and return its exit code (argparse exits become codes).

    `--log-level LEVEL` anywhere in argv is passed to the top-level CLI parser, as for `llmrec --log-level`.
    """
    import argparse

    from llmrec.cli import COMMANDS, build_parser
    from llmrec.cli import main as cli_main

    if command not in COMMANDS:
        raise ValueError(f"unknown llmrec command {command!r}; valid commands are {list(COMMANDS)}")
    args = list(sys.argv[1:] if argv is None else argv)
    top: list[str] = []
    if "--log-level" in args:
        j = args.index("--log-level")
        top, args = args[j : j + 2], args[:j] + args[j + 2 :]
    try:
        sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
        flags = {s for a in sub.choices[command]._actions for s in a.option_strings}
        args = expand_config(args, frozenset(f for f in flags if f.startswith("--no-")))
    except (ValueError, FileNotFoundError) as e:
        print(f"jobs {command}: error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        rc = cli_main([*top, command, *args])
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        code = e.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    logger.info("job %s finished with exit code %d in %.1fs", command, rc, time.perf_counter() - t0)
    return int(rc)
