"""Shim: `python -m jobs.learn` (from the repository root) runs `llmrec.jobs.learn`."""

from __future__ import annotations

import sys

from llmrec.jobs import learn as _job

if __name__ == "__main__":
    sys.exit(_job.main())
sys.modules[__name__] = _job  # importing jobs.learn gives the packaged module itself (one module)
