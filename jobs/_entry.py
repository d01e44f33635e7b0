"""Shim: `jobs._entry` is `llmrec.jobs._entry` (the plumbing shared by the job entrypoints)."""

from __future__ import annotations

import sys

from llmrec.jobs import _entry as _job

sys.modules[__name__] = _job  # `from jobs._entry import X` reads the packaged module itself
