"""Which models an evaluation runs, and how each is built for one split and seed.

Names (the keys of metrics.json "models"): "llmrec" (with "llmrec_neural", the same fit without its
co-occurrence term, added right after it), the baselines of `llmrec.eval.baselines` (`BASELINES`), and the
hybrids (`HYBRIDS`): "hybrid_text_itemknn" = zero-shot text + item-kNN, "hybrid_id_itemknn" = the best ID
model by validation NDCG@10 among the evaluated ones of `ID_MODELS` (else ease and als, tuned for the hybrid
alone) + item-kNN. Every baseline is wrapped in `llmrec.eval.tuning.Tuned` with its grid (`GRIDS`, or
`grids`); llmrec trains on the same validation (`LLMRecRecommender(validation=...)`).

Presets: `FAST_MODELS` (the pipeline's evaluation: llmrec, popularity, item-kNN, EASE (the strongest simple
baseline, and on MovieLens the strongest here), zero-shot text, the serving text fallback (`served_text`,
which the serve-or-not rule reads) and both hybrids, the ID one then being EASE + item-kNN; no ALS, BPR or
SASRec, whose grids or epochs cost minutes each) and `ALL_MODELS`.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmrec.config import HELD_OUT_KINDS
from llmrec.eval.baselines import BASELINES, ID_MODELS, make_baseline
from llmrec.eval.tuning import GRIDS, Hybrid, InnerValidation, Tuned
from llmrec.protocol import ItemSpace, Recommender
from llmrec.schema import META_FILE

if TYPE_CHECKING:  # torch: imported only when llmrec is evaluated
    from llmrec.scorer.recommender import LLMRecRecommender

logger = logging.getLogger(__name__)

__all__ = ["ALL_MODELS", "FAST_MODELS", "HYBRIDS", "ModelSetup", "build_models", "llmrec_train_config"]

HYBRIDS = ("hybrid_text_itemknn", "hybrid_id_itemknn")
ALL_MODELS = ("llmrec",) + BASELINES + HYBRIDS
FAST_MODELS = ("llmrec", "popularity", "itemknn", "ease", "zeroshot_text", "served_text") + HYBRIDS
HIDDEN_ID_PARTS = ("ease", "als")  # ID candidates a hybrid tunes itself when no ID model is evaluated


@dataclass
class ModelSetup:
    """Everything a model needs for one (split, seed)."""

    seed: int
    validation: InnerValidation
    space: ItemSpace
    scorer_dir: Path
    grids: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # overrides of tuning.GRIDS
    baseline_kwargs: dict[str, dict[str, Any]] = field(
        default_factory=dict
    )  # constructor kwargs, every config
    llmrec_kwargs: dict[str, Any] = field(default_factory=dict)  # overrides of the run scorer's settings
    reuse_scorer: bool = False  # llmrec: load RUN/scorer when it was trained on this very split
    # the cold protocol: llmrec's cold-item choice on this share of the train split's items held out
    # (`llmrec.eval.cold_choice`; the run scorer's held-out kind, held-out-new for a made-cold one); None: as
    # the run's scorer made it (TrainConfig.cold_choice: made-cold, or a held-out kind on
    # `cold_choice.HELD_OUT_FRAC` of the items)
    cold_choice_frac: float | None = None


def build_models(names: list[str], setup: ModelSetup) -> list[Recommender]:
    """Fresh models for `names` in evaluation order (hybrids last, after the parts they combine)."""
    unknown = [n for n in names if n not in ALL_MODELS]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; choose from {list(ALL_MODELS)} (or pass extra_models)")
    out: list[Recommender] = []
    tuned: dict[str, Tuned] = {}
    for name in [n for n in names if n not in HYBRIDS]:
        if name == "llmrec":
            model = _llmrec(setup)
            out += [model, model.neural_only()]  # the same fit ranked without its co-occurrence term
            continue
        tuned[name] = _tuned(name, setup)
        out.append(tuned[name])
    for name in [n for n in names if n in HYBRIDS]:
        owned: list[Tuned] = []

        def part(n: str, owned: list[Tuned] = owned) -> Tuned:
            if n not in tuned:
                tuned[n] = _tuned(n, setup)
                owned.append(tuned[n])
            return tuned[n]

        if name == "hybrid_text_itemknn":
            cands = [part("zeroshot_text")]
        else:
            ids = [n for n in ID_MODELS if n in names] or list(HIDDEN_ID_PARTS)
            cands = [part(n) for n in ids]
        out.append(Hybrid(name, cands, part("itemknn"), owned=owned))
    return out


def _tuned(name: str, setup: ModelSetup) -> Tuned:
    kwargs = setup.baseline_kwargs.get(name, {})
    grid = setup.grids.get(name, GRIDS[name])

    def factory(**params: Any) -> Recommender:
        return make_baseline(name, seed=setup.seed, **{**kwargs, **params})  # type: ignore[return-value]

    early = bool(getattr(factory(**grid[0]), "early_stopping", False))
    return Tuned(name, factory, grid, setup.validation, refit=not early)


def _llmrec(setup: ModelSetup) -> LLMRecRecommender:
    from llmrec.scorer.recommender import LLMRecRecommender, reusable_scorer  # torch: only when llmrec runs

    kwargs = {**llmrec_train_config(setup.scorer_dir), **setup.llmrec_kwargs, "seed": setup.seed}
    val = setup.validation
    choice = None
    # the run's scorer's kind, made on this split as `llmrec train` made it: evaluated as it is served; a
    # made-cold scorer's proxy fails on never-trained items, so the cold protocol makes held-out-new for it
    kind = kwargs.get("cold_choice", "made-cold")
    if setup.cold_choice_frac is not None and kind not in HELD_OUT_KINDS:
        kind = "held-out-new"
    if kind in HELD_OUT_KINDS:
        from llmrec.eval.cold_choice import HELD_OUT_FRAC, held_out_cold_choice

        frac = HELD_OUT_FRAC if setup.cold_choice_frac is None else float(setup.cold_choice_frac)
        kwargs["cold_choice"] = kind

        def choice(train: Any, items: ItemSpace) -> tuple[dict[str, Any], dict[str, Any]]:
            return held_out_cold_choice(train, items, kwargs, seed=setup.seed, frac=frac)
    if setup.reuse_scorer:
        ok, why = reusable_scorer(setup.scorer_dir, val.train, val.valid, setup.space)
        if ok:
            logger.info(
                "llmrec: the run's scorer was trained on this very split: evaluating it, no retraining"
            )
            return LLMRecRecommender(out_dir=setup.scorer_dir, pretrained=True, validation=val,
                                     cold_chooser=choice, cold_choice=kind)
        logger.info("llmrec: the run's scorer cannot be reused (%s): retraining it on this split", why)
    logger.info("llmrec is trained on this split's train with %s", kwargs)
    return LLMRecRecommender(validation=val, cold_chooser=choice, **kwargs)


def llmrec_train_config(scorer_dir: str | os.PathLike) -> dict[str, Any]:
    """Training settings of the run's scorer (scorer/meta.json "config"), to retrain it alike on a split.

    The run's own scorer was trained on every interaction unless `llmrec train --holdout loo` made it, so
    evaluation scores with it only after `reusable_scorer` has checked that; otherwise it borrows its
    settings. Returns {} when there is no scorer artifact.
    """
    path = Path(scorer_dir) / META_FILE
    if not path.is_file():
        logger.info("no %s: llmrec is trained with fit_scorer defaults", path)
        return {}
    import dataclasses

    from llmrec.config import TrainConfig

    cfg = json.loads(path.read_text()).get("config", {}) or {}
    # the TrainConfig fields (meta.json "config" also records the Ray run's name and the resumed checkpoint)
    keep = {f.name for f in dataclasses.fields(TrainConfig)}
    return {k: v for k, v in cfg.items() if k in keep}
