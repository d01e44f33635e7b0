"""Shim: `python -m jobs.prepare` (from the repository root) runs `llmrec.jobs.prepare`."""

from __future__ import annotations

import sys

from llmrec.jobs import prepare as _job

if __name__ == "__main__":
    sys.exit(_job.main())
sys.modules[__name__] = _job  # importing jobs.prepare gives the packaged module itself (one module)
