"""Shim: `python -m jobs.embed_catalog` (from the repository root) runs `llmrec.jobs.embed_catalog`."""

from __future__ import annotations

import sys

from llmrec.jobs import embed_catalog as _job

if __name__ == "__main__":
    sys.exit(_job.main())
sys.modules[__name__] = _job  # importing jobs.embed_catalog gives the packaged module itself (one module)
