"""Amazon All Beauty 5-core (2018): reviews only; see llmrec.data.adapters.amazon_reviews.
Tests: test_prepare.py."""

from __future__ import annotations

from pathlib import Path

from llmrec.data.adapters import Loaded
from llmrec.data.adapters.amazon_reviews import load_reviews

NAME = "amazon-all-beauty-5core-2018"
FILE = "All_Beauty_5.json.gz"


def load(source: Path) -> Loaded:
    return load_reviews(source, FILE, "All Beauty", NAME)
