"""Which artifacts a serving app uses, and loading them: the run folder's embeddings, index and scorer.

- `RunArtifacts`: the folders (and ranking knobs) one app serves, resolved ONCE per app by `build_app` with
  `resolve_artifacts(run_dir, user_config)` and handed to the deployments. A replica resolves again only
  for another user_config (a `serve deploy` that changed it) or when the learning loop's model registry
  changed since (`registry_mtime_ns`); so every replica of an app serves the same choice, and the choice
  (registry, RUN/eval/metrics.json) is read once, not once per deployment and again per reconfigure.
- `load_catalog_from(embeddings_dir, run_dir)`: the served catalog (titles and popularity from RUN).
- `load_text_encoder(model, embed_meta, device)`: the BERT encoder of queries and text feedback.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmrec import schema

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunArtifacts:
    """The artifacts one serving app uses (`resolve_artifacts`). Equal values = the same model and knobs."""

    embeddings_dir: str  # item text vectors: the catalog, the encoder's model, the Ingress's item ids
    index_dir: str  # the item index (text space)
    scorer_dir: str | None  # the trained scorer; None = rank with the state's text user vector
    scorer_why: str  # why this scorer (or none) serves; GET /admin/model shows it
    model_version: str | None  # user_config.model_version; None = a hash of the artifacts' created_at
    rank: Mapping[str, Any]  # user_config.rank: RankConfig fields
    # what the choice was made from (not part of equality): the user_config, and the model registry's mtime
    # then (None = no registry), so that a replica started later sees whether the registry moved since
    user_config: Mapping[str, Any] = field(default_factory=dict, compare=False)
    registry_mtime_ns: int | None = field(default=None, compare=False)

    def same_files(self, other: RunArtifacts) -> bool:
        """Same embeddings, index and scorer folders (a change of knobs or version label needs no reload)."""
        return (self.embeddings_dir, self.index_dir, self.scorer_dir) == (
            other.embeddings_dir, other.index_dir, other.scorer_dir)


def resolve_artifacts(run_dir: str | os.PathLike, user_config: Mapping[str, Any] | None) -> RunArtifacts:
    """The artifacts of a run: RUN/{embeddings,index,scorer} unless user_config overrides them.

    The scorer: `user_config.scorer_dir` when given (null = none), else the current entry of the learning
    loop's registry (RUN/models.json), else RUN/scorer when the run's evaluation measured it above the text
    fallback (`recommend_core.default_scorer_is_better`).
    """
    cfg = dict(user_config or {})
    run = Path(run_dir)
    mtime = registry_mtime_ns(run)  # before reading it: a registry written meanwhile shows as a change
    why = "user_config.scorer_dir"
    if "scorer_dir" in cfg:  # an explicit choice (a path, or null for none) always wins
        scorer = cfg["scorer_dir"]
    elif mtime is not None:  # the learning loop's registry (llmrec.learn)
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
    return RunArtifacts(
        embeddings_dir=embeddings_dir_of(run, cfg),
        index_dir=str(cfg.get("index_dir") or run / schema.RUN_INDEX),
        scorer_dir=str(scorer) if scorer else None,
        scorer_why=why,
        model_version=cfg.get("model_version"),
        rank=dict(cfg.get("rank") or {}),
        user_config=cfg,
        registry_mtime_ns=mtime,
    )


def embeddings_dir_of(run_dir: str | os.PathLike, user_config: Mapping[str, Any] | None) -> str:
    """The embeddings folder a user_config serves (RUN/embeddings unless it names one); reads nothing."""
    return str((user_config or {}).get("embeddings_dir") or Path(run_dir) / schema.RUN_EMBEDDINGS)


def registry_mtime_ns(run_dir: str | os.PathLike) -> int | None:
    """The mtime of the run's model registry (RUN/models.json), None when there is none."""
    from llmrec.learn import REGISTRY_FILE

    try:
        return (Path(run_dir) / REGISTRY_FILE).stat().st_mtime_ns
    except FileNotFoundError:
        return None


def load_catalog_from(embeddings_dir: str, run_dir: str) -> tuple[Any, dict[str, Any]]:
    """`load_catalog` for RUN, but with the embeddings taken from `embeddings_dir` when it is elsewhere."""
    from llmrec.embed.artifact import load_embeddings
    from llmrec.serve.recommend_core import Catalog, load_catalog

    default = Path(run_dir) / schema.RUN_EMBEDDINGS
    if Path(embeddings_dir).resolve() == default.resolve():
        return load_catalog(run_dir)
    base, _ = load_catalog(run_dir) if default.is_dir() else (None, None)
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

