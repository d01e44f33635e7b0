"""Job: batch top-k recommendations for a users file (RUN + users -> parquet), ranked as `/recommend` ranks.

Flags are exactly those of `llmrec recommend`; `--config FILE.yaml` takes them from a reviewed YAML file like
cluster/jobs/recommend.yaml (command-line flags win). With URIs the Ray workers read the run and the users
file and write the output themselves, so any node may run them::

    ray job submit --address http://127.0.0.1:8265 --runtime-env cluster/runtime_env.yaml -- \
        python -m jobs.recommend --run s3://bucket/runs/ml --users s3://bucket/users.txt \
        --out s3://bucket/recs/ml.parquet

Locally, without a cluster: `python -m jobs.recommend ...` (or `llmrec recommend ...`) starts an embedded Ray.
"""

from __future__ import annotations

import sys

from llmrec.jobs._entry import run_command

COMMAND = "recommend"


def main(argv: list[str] | None = None) -> int:
    """Run `llmrec recommend *argv`; returns the exit code (0 ok, 2 bad input)."""
    return run_command(COMMAND, argv)


if __name__ == "__main__":
    sys.exit(main())
