"""Shim: `python -m jobs.tune_encoder` (from the repository root) runs `llmrec.jobs.tune_encoder`."""

from __future__ import annotations

import sys

from llmrec.jobs import tune_encoder as _job

if __name__ == "__main__":
    sys.exit(_job.main())
sys.modules[__name__] = _job  # importing jobs.tune_encoder gives the packaged module itself (one module)
