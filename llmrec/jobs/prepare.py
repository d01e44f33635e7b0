"""Job: read a raw dataset into the canonical items/interactions tables (RUN/data/).

Flags are exactly those of `llmrec prepare`; `--config FILE.yaml` takes them from a reviewed
YAML file like those in cluster/jobs/ (command-line flags win). Submit to a running cluster::

    ray job submit --address http://127.0.0.1:8265 --runtime-env cluster/runtime_env.yaml -- \
        python -m jobs.prepare --dataset movielens-latest-small --source /data/movielens-latest-small \
            --out /mnt/runs/ml/data

Locally, without a cluster: `python -m jobs.prepare ...` (or `llmrec prepare ...`) starts an embedded Ray.
"""

from __future__ import annotations

import sys

from llmrec.jobs._entry import run_command

COMMAND = "prepare"


def main(argv: list[str] | None = None) -> int:
    """Run `llmrec prepare *argv`; returns the exit code (0 ok, 2 bad input)."""
    return run_command(COMMAND, argv)


if __name__ == "__main__":
    sys.exit(main())
