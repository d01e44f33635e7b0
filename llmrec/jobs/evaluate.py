"""Job: offline evaluation of the scorer and the baselines (RUN -> RUN/eval).

Flags are exactly those of `llmrec evaluate`; `--config FILE.yaml` takes them from a reviewed
YAML file like those in cluster/jobs/ (command-line flags win). Submit to a running cluster::

    ray job submit --address http://127.0.0.1:8265 --runtime-env cluster/runtime_env.yaml -- \
        python -m jobs.evaluate --data /mnt/runs/ml/data --run /mnt/runs/ml --out /mnt/runs/ml/eval

Locally, without a cluster: `python -m jobs.evaluate ...` (or `llmrec evaluate ...`) starts an embedded Ray.
"""

from __future__ import annotations

import sys

from llmrec.jobs._entry import run_command

COMMAND = "evaluate"


def main(argv: list[str] | None = None) -> int:
    """Run `llmrec evaluate *argv`; returns the exit code (0 ok, 2 bad input)."""
    return run_command(COMMAND, argv)


if __name__ == "__main__":
    sys.exit(main())
