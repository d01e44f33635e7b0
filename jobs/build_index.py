"""Shim: `python -m jobs.build_index` (from the repository root) runs `llmrec.jobs.build_index`."""

from __future__ import annotations

import sys

from llmrec.jobs import build_index as _job

if __name__ == "__main__":
    sys.exit(_job.main())
sys.modules[__name__] = _job  # importing jobs.build_index gives the packaged module itself (one module)
