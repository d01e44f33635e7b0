"""llmrec: text-first, feedback-adaptive recommendations on Ray."""

from __future__ import annotations

__version__ = "0.1.0"
