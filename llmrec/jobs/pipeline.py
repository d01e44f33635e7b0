"""Job: the whole batch pipeline prepare -> embed -> index -> train -> evaluate into one run folder.

Flags are exactly those of `llmrec pipeline`; `--config cluster/jobs/pipeline.yaml` takes them from a
reviewed YAML file (command-line flags win). Submit to a running cluster::

    ray job submit --address http://127.0.0.1:8265 --runtime-env cluster/runtime_env.yaml -- \
        python -m jobs.pipeline --dataset movielens-latest-small --source /data/movielens-latest-small \
            --out /mnt/runs/ml

Locally, without a cluster: `python -m jobs.pipeline ...` (or `llmrec pipeline ...`) starts an embedded Ray.
"""

from __future__ import annotations

import sys

from llmrec.jobs._entry import run_command

COMMAND = "pipeline"


def main(argv: list[str] | None = None) -> int:
    """Run `llmrec pipeline *argv`; returns the exit code (0 ok, 2 bad input)."""
    return run_command(COMMAND, argv)


if __name__ == "__main__":
    sys.exit(main())
