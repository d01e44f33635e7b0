"""Optional dependencies: import them where they are used, with an error that names the extra to install.

`pip install llmrec` installs what every stage needs; a few libraries serve one feature only and come with an
extra (pyproject.toml): `eval` (implicit for the ALS baseline, matplotlib for metrics.png), `cpu` / `gpu`
(faiss-cpu / faiss-gpu, exactly one of them), `redis` (the Redis state backend), `dev` (the tests'
references).
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["EXTRA_OF", "MissingExtraError", "require"]

# top-level module -> (the pip distribution, the llmrec extra that installs it)
EXTRA_OF: dict[str, tuple[str, str]] = {
    "implicit": ("implicit", "eval"),
    "matplotlib": ("matplotlib", "eval"),
    "sentence_transformers": ("sentence-transformers", "dev"),
    "redis": ("redis", "redis"),
}


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the extra (and package) that brings it."""


def require(module: str, purpose: str) -> ModuleType:
    """Import `module` (e.g. "implicit.als") or raise MissingExtraError naming the extra to install.

    Args:
        module: dotted module name; its top-level package must be a key of EXTRA_OF.
        purpose: what needs it, for the message ("the ALS baseline").

    Raises:
        MissingExtraError: the module is not importable.
        KeyError: `module` is not a known optional dependency (a programming error).
    """
    top = module.split(".")[0]
    dist, extra = EXTRA_OF[top]
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtraError(
            f"{purpose} needs {dist}, which is not installed ({e}); install the `{extra}` extra: "
            f"pip install 'llmrec[{extra}]' (or pip install {dist}; `make install` does it)"
        ) from e
