"""Job: build the FAISS item index from the embeddings (RUN/embeddings -> RUN/index).

Flags are exactly those of `llmrec index`; `--config cluster/jobs/build_index.yaml` takes them from a
reviewed YAML file (command-line flags win). Submit to a running cluster::

    ray job submit --address http://127.0.0.1:8265 --runtime-env cluster/runtime_env.yaml -- \
        python -m jobs.build_index --embeddings /mnt/runs/ml/embeddings --out /mnt/runs/ml/index \
            --kind auto --check

Locally, without a cluster: `python -m jobs.build_index ...` (or `llmrec index ...`) starts an embedded Ray.
"""

from __future__ import annotations

import sys

from llmrec.jobs._entry import run_command

COMMAND = "index"


def main(argv: list[str] | None = None) -> int:
    """Run `llmrec index *argv`; returns the exit code (0 ok, 2 bad input)."""
    return run_command(COMMAND, argv)


if __name__ == "__main__":
    sys.exit(main())
