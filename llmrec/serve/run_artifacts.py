"""Which artifacts a serving run uses, and loading them: the run folder's embeddings, index and scorer.

- `resolve_artifacts(run_dir, user_config)`: RUN/{embeddings,index,scorer} unless user_config overrides them;
  the scorer by the learning loop's registry when there is one, else by the run's own evaluation
  (`recommend_core.default_scorer_is_better`).
- `load_catalog_from(embeddings_dir, run_dir, loader)`: the served catalog (titles and popularity from RUN).
- `load_text_encoder(model, embed_meta, device)`: the BERT encoder of queries and text feedback.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from llmrec import schema

logger = logging.getLogger(__name__)


def resolve_artifacts(run_dir: str, user_config: dict[str, Any] | None) -> dict[str, Any]:
    """Artifact folders for a run: RUN/{embeddings,index,scorer} unless user_config overrides them."""
    cfg = dict(user_config or {})
    run = Path(run_dir)
    why = "user_config.scorer_dir"
    if "scorer_dir" in cfg:  # an explicit choice (a path, or null for none) always wins
        scorer = cfg["scorer_dir"]
    elif (run / "models.json").is_file():  # the learning loop's registry (llmrec.learn)
        from llmrec.learn import current_scorer

        scorer, why = current_scorer(run)
        why = f"model registry: {why}"
        logger.info("serving the registry's current scorer %s (%s)", scorer, why)
    else:
        from llmrec.serve.recommend_core import default_scorer_is_better

        use, why = default_scorer_is_better(run)
        logger.info("RUN/scorer %s: %s", "used" if use else "not used", why)
        scorer = str(run / schema.RUN_SCORER) if use else None
        why = f"RUN/scorer {'used' if use else 'not used'}: {why}"
    return {
        "embeddings_dir": str(cfg.get("embeddings_dir") or run / schema.RUN_EMBEDDINGS),
        "index_dir": str(cfg.get("index_dir") or run / schema.RUN_INDEX),
        "scorer_dir": str(scorer) if scorer else None,
        "scorer_why": why,
        "model_version": cfg.get("model_version"),
        "rank": dict(cfg.get("rank") or {}),
    }


def load_catalog_from(embeddings_dir: str, run_dir: str, loader: Any) -> tuple[Any, dict[str, Any]]:
    """`load_catalog` for RUN, but with the embeddings taken from `embeddings_dir` when it is elsewhere."""
    from llmrec.embed.artifact import load_embeddings
    from llmrec.serve.recommend_core import Catalog

    default = Path(run_dir) / schema.RUN_EMBEDDINGS
    if Path(embeddings_dir).resolve() == default.resolve():
        return loader(run_dir)
    base, _ = loader(run_dir) if default.is_dir() else (None, None)
    emb = load_embeddings(embeddings_dir)
    titles = pop = None
    if base is not None:
        titles = np.array(
            [base.titles[base.id_to_idx[i]] if i in base.id_to_idx else i for i in emb.item_ids], dtype=object
        )
        raw_pop = np.expm1(base.pop_score.astype(np.float64))
        pop = np.array([raw_pop[base.id_to_idx[i]] if i in base.id_to_idx else 0.0 for i in emb.item_ids])
    return Catalog(item_ids=emb.item_ids, vectors=emb.vectors, titles=titles, popularity=pop), dict(emb.meta)


def load_text_encoder(model: str | None, embed_meta: dict[str, Any], device: str) -> Any:
    from llmrec.embed.encoder import TextEncoder, model_for_meta

    if model is None:
        model = model_for_meta(embed_meta)
    return TextEncoder(model, device=device, max_length=int(embed_meta.get("max_length") or 128))

