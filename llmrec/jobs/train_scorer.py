"""Job: train the scorer on Ray Train (RUN/data + RUN/embeddings -> RUN/scorer).

Flags are exactly those of `llmrec train`; `--config FILE.yaml` takes them from a reviewed
YAML file like those in cluster/jobs/ (command-line flags win). Submit to a running cluster::

    ray job submit --address http://127.0.0.1:8265 --runtime-env cluster/runtime_env.yaml -- \
        python -m jobs.train_scorer --data /mnt/runs/ml/data --embeddings /mnt/runs/ml/embeddings \
            --out /mnt/runs/ml/scorer

Locally, without a cluster: `python -m jobs.train_scorer ...` (or `llmrec train ...`) starts an embedded Ray.
"""

from __future__ import annotations

import sys

from llmrec.jobs._entry import run_command

COMMAND = "train"


def main(argv: list[str] | None = None) -> int:
    """Run `llmrec train *argv`; returns the exit code (0 ok, 2 bad input)."""
    return run_command(COMMAND, argv)


if __name__ == "__main__":
    sys.exit(main())
