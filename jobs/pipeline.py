"""Shim: `python -m jobs.pipeline` (from the repository root) runs `llmrec.jobs.pipeline`."""

from __future__ import annotations

import sys

from llmrec.jobs import pipeline as _job

if __name__ == "__main__":
    sys.exit(_job.main())
sys.modules[__name__] = _job  # importing jobs.pipeline gives the packaged module itself (one module)
