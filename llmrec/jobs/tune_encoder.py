"""Job: fine-tune the text encoder's top layers on next-item pairs on Ray Train (RUN/data -> RUN/encoder).

Flags are exactly those of `llmrec tune-encoder`; `--config cluster/jobs/tune_encoder.yaml` takes them from a
reviewed YAML file (command-line flags win). Submit to a running cluster, then re-embed with the result::

    ray job submit --address http://127.0.0.1:8265 --runtime-env cluster/runtime_env.yaml -- \
        python -m jobs.tune_encoder --data /mnt/runs/ml/data --out /mnt/runs/ml/encoder \
        --checkpoint-dir s3://bucket/ckpt --num-workers 2 --use-gpu
    ... python -m jobs.embed_catalog --items /mnt/runs/ml/data --model /mnt/runs/ml/encoder --out ...

Locally, without a cluster: `python -m jobs.tune_encoder ...` (or `llmrec tune-encoder ...`) starts an
embedded Ray.
"""

from __future__ import annotations

import sys

from llmrec.jobs._entry import run_command

COMMAND = "tune-encoder"


def main(argv: list[str] | None = None) -> int:
    """Run `llmrec tune-encoder *argv`; returns the exit code (0 ok, 2 bad input)."""
    return run_command(COMMAND, argv)


if __name__ == "__main__":
    sys.exit(main())
