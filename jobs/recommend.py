"""Shim: `python -m jobs.recommend` (from the repository root) runs `llmrec.jobs.recommend`."""

from __future__ import annotations

import sys

from llmrec.jobs import recommend as _job

if __name__ == "__main__":
    sys.exit(_job.main())
sys.modules[__name__] = _job  # importing jobs.recommend gives the packaged module itself (one module)
