"""Logging setup for entrypoints only (CLI, jobs, benchmarks). Library modules just getLogger(__name__)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # Ray and HTTP clients are chatty at INFO; keep the driver readable.
    for name in ("urllib3", "httpx", "filelock", "ray.serve", "faiss.loader"):
        logging.getLogger(name).setLevel(logging.WARNING)


@contextmanager
def timed() -> Iterator[list[float]]:
    """`with timed() as t: ...; t[0]` is the elapsed seconds after the block."""
    box = [0.0]
    t0 = time.perf_counter()
    try:
        yield box
    finally:
        box[0] = time.perf_counter() - t0
