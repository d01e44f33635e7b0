"""Shim: `python -m jobs.evaluate` (from the repository root) runs `llmrec.jobs.evaluate`."""

from __future__ import annotations

import sys

from llmrec.jobs import evaluate as _job

if __name__ == "__main__":
    sys.exit(_job.main())
sys.modules[__name__] = _job  # importing jobs.evaluate gives the packaged module itself (one module)
