"""Shim: `python -m jobs.deploy` (from the repository root) runs `llmrec.jobs.deploy`."""

from __future__ import annotations

import sys

from llmrec.jobs import deploy as _job

if __name__ == "__main__":
    sys.exit(_job.main())
sys.modules[__name__] = _job  # importing jobs.deploy gives the packaged module itself (one module)
