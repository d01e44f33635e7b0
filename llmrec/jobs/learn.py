"""Job: one round of the learning loop (RUN/events since the serving scorer -> a fine-tuned candidate, judged
on held-back events, made current in RUN/models.json only when not worse; the running app swaps it in).

Flags are exactly those of `llmrec learn`; `--config FILE.yaml` takes them from a YAML file. On a schedule::

    ray job submit --address http://127.0.0.1:8265 --runtime-env cluster/runtime_env.yaml -- \
        python -m jobs.learn --run /mnt/runs/ml
"""

from __future__ import annotations

import sys

from llmrec.jobs._entry import run_command

COMMAND = "learn"


def main(argv: list[str] | None = None) -> int:
    """Run `llmrec learn *argv`; returns the exit code (0 ok, 2 bad input)."""
    return run_command(COMMAND, argv)


if __name__ == "__main__":
    sys.exit(main())
