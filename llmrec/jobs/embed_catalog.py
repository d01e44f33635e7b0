"""Job: embed every item text with the BERT encoder on Ray Data (RUN/data -> RUN/embeddings).

Flags are exactly those of `llmrec embed`; `--config cluster/jobs/embed_catalog.yaml` takes them from a
reviewed YAML file (command-line flags win). Submit to a running cluster::

    ray job submit --address http://127.0.0.1:8265 --runtime-env cluster/runtime_env.yaml -- \
        python -m jobs.embed_catalog --items /mnt/runs/ml/data --out /mnt/runs/ml/embeddings

Locally, without a cluster: `python -m jobs.embed_catalog ...` (or `llmrec embed ...`) starts an embedded Ray.
"""

from __future__ import annotations

import sys

from llmrec.jobs._entry import run_command

COMMAND = "embed"


def main(argv: list[str] | None = None) -> int:
    """Run `llmrec embed *argv`; returns the exit code (0 ok, 2 bad input)."""
    return run_command(COMMAND, argv)


if __name__ == "__main__":
    sys.exit(main())
