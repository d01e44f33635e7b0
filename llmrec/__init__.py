"""llmrec: text-first, feedback-adaptive recommendations on Ray.

The public API is re-exported here lazily (importing `llmrec` pulls in neither torch nor ray)::

    from llmrec import prepare, embed_catalog, build_index, ItemIndex, evaluate
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "prepare": "llmrec.data.prepare",
    "read_items": "llmrec.data.tables",
    "read_interactions": "llmrec.data.tables",
    "TextEncoder": "llmrec.embed.encoder",
    "EmbedConfig": "llmrec.config",
    "embed_catalog": "llmrec.embed.ray_embed",
    "load_embeddings": "llmrec.embed.artifact",
    "ItemIndex": "llmrec.index.item_index",
    "IndexConfig": "llmrec.config",
    "build_index": "llmrec.index.build",
    "TrainConfig": "llmrec.config",
    "fit_scorer": "llmrec.scorer.train",
    "Scorer": "llmrec.scorer.inference",
    "evaluate": "llmrec.eval.evaluate",
    "StateStore": "llmrec.state.store",
    "ServeConfig": "llmrec.config",
    "build_app": "llmrec.serve.app",
}

__all__ = [  # a literal list (tests/test_public_api.py pins it): the public API is read here, not computed
    "__version__",
    "prepare",
    "read_items",
    "read_interactions",
    "TextEncoder",
    "EmbedConfig",
    "embed_catalog",
    "load_embeddings",
    "ItemIndex",
    "IndexConfig",
    "build_index",
    "TrainConfig",
    "fit_scorer",
    "Scorer",
    "evaluate",
    "StateStore",
    "ServeConfig",
    "build_app",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'llmrec' has no attribute {name!r}")
