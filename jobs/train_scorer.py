"""Shim: `python -m jobs.train_scorer` (from the repository root) runs `llmrec.jobs.train_scorer`."""

from __future__ import annotations

import sys

from llmrec.jobs import train_scorer as _job

if __name__ == "__main__":
    sys.exit(_job.main())
sys.modules[__name__] = _job  # importing jobs.train_scorer gives the packaged module itself (one module)
