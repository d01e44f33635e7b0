"""The post-training ranking choices, each measured on validation (`finalize_ranking`): the MLP re-ranker
on/off, the co-occurrence term and its weight (`tune_behaviour`: item-kNN or EASE, `llmrec.cooc`), the text
boost per history-length bucket (`tune_text_boost` / `choose_text_boost`) and the cold-item bonus,
imputation, slots and neural places (`tune_cold_bonus`). Each grid value ranks every validation user as served
(`served_val_ndcg`); the choices that prefer text take the largest value that ties with the best
(`largest_tied`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from llmrec.config import TrainConfig
from llmrec.cooc import ITEMKNN, CoocCounts, history_scores
from llmrec.data.histories import attach_item_idx
from llmrec.metrics import recall_ndcg
from llmrec.protocol import ItemSpace
from llmrec.schema import USER_ID
from llmrec.scorer import data as sdata
from llmrec.scorer.model import ScorerConfig, ScorerModel, cold_slot_scores
from llmrec.scorer.validate import two_stage_chunks

logger = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """Training ended with weights that cannot rank (non-finite or zero scale): a learning rate too high."""


# co-occurrence weights tried on validation, in logit units (the head's scale; u.v is divided by `scale`)
COOC_GRID = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0)
# multipliers of the text-arm gain tried per history-length bucket after training (tune_text_boost)
TEXT_BOOST_GRID = (1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 8.0, 16.0)
# A tie, in the post-training choices that prefer text (`tied_with_best`: text boost, cold bonus): a value
# whose validation NDCG is within TEXT_BOOST_Z standard errors of the paired difference to the best (1.96: not
# worse at 95%, the yardstick by which a ranking change counts as no regression) AND within TIE_REL of the
# best's mean. The relative bound matters for small buckets, whose wide standard errors alone would let a
# boost cost a third of the bucket's NDCG (MovieLens, 145 users: 16x text at 0.084 vs 0.133). Text is what a
# user can see and steer, so it wins every tie.
TEXT_BOOST_Z = 1.96
TIE_REL = 0.02
# cold-item bonuses tried on validation (u.v units, tune_cold_bonus), with this share of the warm items made
# cold
COLD_BONUS_GRID = (0.0, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8)
COLD_VAL_FRAC = 0.1
# multipliers of the co-occurrence score items without co-occurrence data borrow from their text neighbours
# (`ScorerConfig.cooc_impute`), tried with the cold bonus (tune_cold_bonus)
COLD_IMPUTE_GRID = (0.0, 0.5, 1.0)
# cold-item slots (`ScorerConfig.cold_every`: one cold item in every that many positions; 0 = none), tried
# with the cold bonus and the imputation (tune_cold_bonus)
COLD_EVERY_GRID = (0, 10, 5, 3)
# cold items' neural places (`ScorerConfig.cold_keep`: a cold item no lower than that many times its place
# without the co-occurrence term; 0 = off), tried with the slots (tune_cold_bonus)
COLD_KEEP_GRID = (0.0, 1.0, 1.5, 2.0, 3.0)


@dataclasses.dataclass(frozen=True)
class BehaviourTerms:
    """The co-occurrence terms a scorer may rank with (`llmrec.cooc.candidate_terms`).

    train: {term name: (N, N) matrix over the training positives}, in order of preference (the first wins
        ties and is shipped when nothing is measured); the choices on validation rank with these.
    full: term name -> the same term over training + validation positives, the matrix shipped (built only
        for the chosen term: an EASE term costs a dense inverse).
    """

    train: Mapping[str, sp.csr_matrix]
    full: Callable[[str], sp.csr_matrix]

    def __post_init__(self) -> None:
        if not self.train:
            raise ValueError("BehaviourTerms needs at least one term")


# the cold-item choices (`tune_cold_bonus`), as ScorerConfig fields
COLD_CHOICES = ("cold_bonus", "cooc_impute", "cold_every", "cold_keep")


def cold_choices(summary: dict[str, Any]) -> dict[str, Any]:
    """The `COLD_CHOICES` fields (ScorerConfig values) of a `tune_cold_bonus` summary."""
    return dict(zip(COLD_CHOICES, (summary["chosen"], summary["cooc_impute"], summary["cold_every"],
                                   summary["cold_keep"]), strict=True))


# the post-training choices a fine-tune may keep from the model it starts from (`finalize_ranking(reuse=)`)
REUSABLE_CHOICES = ("cooc_weight", "text_boost", *COLD_CHOICES)


def finalize_ranking(
    state: dict,
    static: dict,
    terms: BehaviourTerms | None,
    cfg: TrainConfig,
    reuse: Mapping[str, Any] | None = None,
    cold_pick: tuple[Mapping[str, Any], Mapping[str, Any]] | None = None,
) -> tuple[dict, sp.csr_matrix | None, dict, dict, dict, dict]:
    """Post-training choices, each measured on validation: the MLP re-ranker on/off, then the co-occurrence
    term and its weight (`tune_behaviour`), then the text boost per history-length bucket (`tune_text_boost`),
    then the cold-item bonus, imputation and slots (`tune_cold_bonus`).

    terms: the co-occurrence terms to choose from, or None (no co-occurrence term).
    reuse: {"from": folder, "model_config": its model config, "term": its co-occurrence term} of the model a
        fine-tune starts from: its `REUSABLE_CHOICES` and term are kept instead of chosen again (a learning
        round: most of its time is these choices); the re-ranker is still measured and the served ranking
        still validated. Ignored (everything chosen again, and said why) when its term is not among `terms`.
    cold_pick: ({field: value} for every `COLD_CHOICES` field, summary for meta.json "cold_bonus") made
        elsewhere (the held-out kinds of `TrainConfig.cold_choice`: `llmrec.eval.cold_choice.
        held_out_cold_choice`), used in place of `tune_cold_bonus`'s made-cold choice; the served ranking is
        validated with it.
    Returns (state with
    model_config updated, the chosen term's matrix to ship (train + validation) or None, the co-occurrence,
    text-boost and cold-bonus summaries for meta.json, and the served ranking's validation: {"val_ndcg@10",
    "n_users", "targets_sha1", "per_user": (U,) NDCG@10} or {} without validation users)."""
    m = state["metrics"]
    mc = dict(state["model_config"])
    if "val_ndcg@10" in m and "val_retrieval_ndcg@10" in m:
        # measured, not assumed: keep the MLP re-ranker only if it beat retrieval alone on validation
        mc["rerank"] = bool(m["val_ndcg@10"] >= m["val_retrieval_ndcg@10"])
        logger.info("re-ranker %s: val ndcg@10 two-stage %.4f vs retrieval-only %.4f",
                    "on" if mc["rerank"] else "off", m["val_ndcg@10"], m["val_retrieval_ndcg@10"])
    info: dict[str, Any] = {"cooc_neighbors": cfg.cooc_neighbors}
    boost_info: dict[str, Any] = {}
    cold_info: dict[str, Any] = {}
    mc["cooc_weight"] = 0.0
    t0 = time.perf_counter()
    val = static["val"]
    has_val = val is not None and val.n_users > 0

    def model_for(c: dict) -> ScorerModel:
        mod = ScorerModel(  # torch.tensor copies: the arrays may be read-only views of Ray's object store
            ScorerConfig(**c),
            torch.tensor(static["text_vectors"]),
            torch.tensor(static["id_slots"]),
            torch.tensor(static["item_counts"]),
        )
        mod.load_state_dict(state["model"])
        return mod

    sim_train = None
    term = next(iter(terms.train)) if terms is not None else None
    if reuse is not None:
        prev, prev_term = reuse["model_config"], reuse.get("term")
        if terms is not None and prev.get("cooc_weight", 0.0) and prev_term not in terms.train:
            logger.warning("the post-training choices of %s are chosen again: its co-occurrence term %s is "
                           "not one of %s", reuse["from"], prev_term, list(terms.train))
            reuse = None
    if reuse is not None:
        for k in REUSABLE_CHOICES:
            if k in prev:
                mc[k] = prev[k]
        if terms is None:
            mc["cooc_weight"] = 0.0
        else:
            term = prev_term if prev_term in terms.train else term
            sim_train = terms.train[term]
        kept = {k: mc[k] for k in REUSABLE_CHOICES if k in mc}
        info.update(term=term, cooc_weight=mc["cooc_weight"], reused_from=str(reuse["from"]))
        boost_info = {"reused_from": str(reuse["from"]), "text_boost": mc.get("text_boost")}
        cold_info = {"reused_from": str(reuse["from"]), **{k: mc[k] for k in COLD_CHOICES if k in mc}}
        logger.info("post-training choices kept from %s (term %s): %s", reuse["from"], term, kept)
    elif terms is not None and has_val:
        # warm validation has (almost) no cold targets: the term and weight are chosen without the scores that
        # items without co-occurrence data borrow from their text neighbours, and `tune_cold_bonus` decides
        # that borrowing (`cooc_impute`) in a world with cold items
        mc["cooc_impute"] = 0.0
        term, weight, tables = tune_behaviour(model_for(mc), val, terms.train, cfg.n_candidates)
        sim_train = terms.train[term]
        mc["cooc_weight"] = weight
        info.update(term=term, val_ndcg_by_weight=tables[term], cooc_weight=weight,
                    val_ndcg_by_term={t: max(tab.values()) for t, tab in tables.items()})
        logger.info("co-occurrence term %s, weight %.4g chosen on validation (ndcg@10 by weight: %s; best by "
                    "term: %s)", term, weight, tables[term], info["val_ndcg_by_term"])
    elif terms is not None:
        info.update(term=term)
        logger.info("no validation set: co-occurrence weight stays 0 (neural ranking only)")
    if reuse is None and has_val and mc.get("text_arm", True):
        boost, boost_info = tune_text_boost(model_for(mc), val, sim_train, cfg.n_candidates)
        mc["text_boost"] = list(boost)
        logger.info("text boost per history-length bucket %s chosen on validation: %s",
                    list(boost_info["buckets"]), boost)
    if reuse is None and cold_pick is not None:
        pick, cold_summary = cold_pick
        if sorted(pick) != sorted(COLD_CHOICES):
            raise ValueError(f"cold_pick must give exactly the fields {list(COLD_CHOICES)}, got "
                             f"{sorted(pick)}")
        mc.update(pick)
        cold_info = {**cold_summary, "method": cfg.cold_choice}
        logger.info("cold-item choices %s handed in (TrainConfig.cold_choice %s), not chosen on this "
                    "validation", dict(pick), cfg.cold_choice)
    elif reuse is None and has_val:
        t_cold = time.perf_counter()
        bonus, cold_info = tune_cold_bonus(model_for(mc), val, sim_train, cfg.n_candidates)
        mc.update(cold_choices(cold_info))
        cold_info["method"] = "made-cold"
        keep_txt = f"{mc['cold_keep']:g}" if mc["cold_keep"] else "- (off)"
        logger.info("cold-item bonus %.4g, imputed co-occurrence x %.4g, a cold slot every %s positions, "
                    "cold items no lower than %s x their neural place chosen on validation (%s; %.1fs)",
                    bonus, mc["cooc_impute"], mc["cold_every"] or "- (none)", keep_txt,
                    f"{cold_info['n_cold_targets']} targets of "
                    f"{cold_info['n_pseudo_cold_items']} items made cold"
                    if cold_info.get("measured") else cold_info.get("why", ""), time.perf_counter() - t_cold)
    served: dict[str, Any] = {}
    if has_val:
        final = model_for(mc)
        per_user = served_val_ndcg(final, val, sim_train, final.cooc_impute(sim_train), cfg.n_candidates)
        served = {"val_ndcg@10": float(per_user.mean()), "n_users": int(val.n_users),
                  "targets_sha1": validation_fingerprint(val), "per_user": per_user}
        logger.info("served ranking: val ndcg@10 %.4f over %d users", served["val_ndcg@10"], val.n_users)
    if terms is None:
        return {**state, "model_config": mc}, None, info, boost_info, cold_info, served
    sim = terms.full(term)
    info.update(nnz=int(sim.nnz), seconds=time.perf_counter() - t0)
    return {**state, "model_config": mc}, sim, info, boost_info, cold_info, served


def validation_fingerprint(val: sdata.ValidationSet) -> str:
    """sha1 of the validation users' targets in order: two scorers' per-user validation scores pair up row by
    row only when their fingerprints agree (same data, seed and val_users)."""
    h = hashlib.sha1()
    for t in val.targets:
        h.update(np.asarray(t, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()


@torch.no_grad()
def tune_text_boost(
    model: ScorerModel,
    val: sdata.ValidationSet,
    sim: sp.csr_matrix | None,
    n_candidates: int = 200,
    k: int = 10,
    grid: Iterable[float] = TEXT_BOOST_GRID,
    min_users: int = 30,
    chunk: int = 256,
) -> tuple[tuple[float, ...], dict[str, Any]]:
    """The multiplier of the text-arm gain beta(n) per history-length bucket (`ScorerConfig.text_boost`).

    Every grid value is applied to all validation users (final ranking as served, co-occurrence term
    included, items without co-occurrence data imputed as `model.cooc_impute(sim)` says), then
    `choose_text_boost` picks per bucket from the per-user NDCG@k. Returns (boost per bucket,
    {buckets, grid, n_users, val_ndcg (per bucket per grid value), chosen, measured, z}).
    """
    from llmrec.scorer.model import LEN_BUCKETS

    grid = [float(g) for g in grid]
    lens = np.minimum(np.asarray(val.hist_len), model.cfg.max_len)
    bucket = np.clip(np.searchsorted(LEN_BUCKETS, lens, side="right") - 1, 0, None)
    impute = model.cooc_impute(sim)
    per = np.zeros((len(grid), val.n_users))
    saved = model.text_boost.clone()
    try:
        for gi, g in enumerate(grid):
            model.text_boost.fill_(g)
            per[gi] = served_val_ndcg(model, val, sim, impute, n_candidates, k, chunk)
    finally:
        model.text_boost.copy_(saved)
    chosen, measured = choose_text_boost(per, bucket, grid, len(LEN_BUCKETS), min_users)
    table = {
        str(LEN_BUCKETS[b]): [float(x) for x in per[:, bucket == b].mean(1)] if (bucket == b).any() else []
        for b in range(len(LEN_BUCKETS))
    }
    return chosen, {"buckets": list(LEN_BUCKETS), "grid": grid, "chosen": list(chosen), "measured": measured,
                    "z": TEXT_BOOST_Z, "rel": TIE_REL,
                    "n_users": [int((bucket == b).sum()) for b in range(len(LEN_BUCKETS))], "val_ndcg": table}


def choose_text_boost(
    per: np.ndarray,
    bucket: np.ndarray,
    grid: Sequence[float],
    n_buckets: int,
    min_users: int = 30,
    z: float = TEXT_BOOST_Z,
    rel: float = TIE_REL,
) -> tuple[tuple[float, ...], list[bool]]:
    """Per history-length bucket, the text boost to rank with, from per-user validation NDCG.

    Args:
        per: float (G, U), NDCG@k of validation user u ranked with grid value g.
        bucket: int (U,), each user's history-length bucket in [0, n_buckets).
        grid: the G boosts tried.
        min_users: a bucket with fewer validation users is not measured.
        z: tolerance in standard errors of the paired difference (`TEXT_BOOST_Z`).
        rel: tolerance relative to the best mean (`TIE_REL`).

    A measured bucket takes the LARGEST boost that ties with the bucket's best (`largest_tied`: within z
    standard errors of the paired difference and within rel of its mean; text wins ties). An unmeasured
    bucket takes the choice of the nearest measured shorter bucket, or when there is none, of the nearest
    measured longer one (a one-like user in a dataset whose validation users all have longer histories gets at
    least the text of the shortest measured histories); with no measured bucket every boost is 1. Measured
    choices never grow with history length (each is capped by the previous measured one). Returns (boost per
    bucket, measured per bucket).
    """
    per = np.asarray(per, dtype=np.float64)
    bucket = np.asarray(bucket)
    if per.ndim != 2 or per.shape != (len(grid), len(bucket)):
        raise ValueError(f"per must be (len(grid)={len(grid)}, users={len(bucket)}), got {per.shape}")
    picks: list[float | None] = []
    for b in range(n_buckets):
        sel = bucket == b
        n = int(sel.sum())
        if n < max(min_users, 2):
            picks.append(None)
            continue
        pick = largest_tied(per[:, sel], grid, z, rel)
        prev = next((p for p in reversed(picks) if p is not None), None)
        picks.append(pick if prev is None else min(pick, prev))
    measured = [p is not None for p in picks]
    out: list[float] = []
    for b in range(n_buckets):
        shorter = [p for p in picks[:b + 1] if p is not None]
        longer = [p for p in picks[b:] if p is not None]
        out.append(shorter[-1] if shorter else (longer[0] if longer else 1.0))
    return tuple(out), measured


@torch.no_grad()
def tune_cold_bonus(
    model: ScorerModel,
    val: sdata.ValidationSet,
    sim: sp.csr_matrix | None,
    n_candidates: int = 200,
    k: int = 10,
    grid: Iterable[float] = COLD_BONUS_GRID,
    frac: float = COLD_VAL_FRAC,
    seed: int = 0,
    min_targets: int = 30,
    chunk: int = 256,
    impute_grid: Iterable[float] = COLD_IMPUTE_GRID,
    every_grid: Iterable[int] = COLD_EVERY_GRID,
    tie_on: str = "all",
    keep_grid: Iterable[float] = COLD_KEEP_GRID,
) -> tuple[float, dict[str, Any]]:
    """The cold-item bonus (`ScorerConfig.cold_bonus`, u.v units), the co-occurrence score cold items
    borrow from their text neighbours (`ScorerConfig.cooc_impute`), the cold-item slots of the list
    (`ScorerConfig.cold_every`) and cold items' neural places (`ScorerConfig.cold_keep`), chosen on validation
    in a world with cold items.

    Validation targets are almost never cold (an item without training events rarely is anyone's next one), so
    a seeded `frac` of the items that have an ID embedding is made cold for the measurement: their ID slots
    set to 0 (they then borrow their text neighbours' ID vectors, as a real cold item does) and their rows and
    columns of the co-occurrence matrix removed. Every (imputation, bonus, slots, neural place) setting ranks
    every validation user (final ranking as served). Of the settings whose overall NDCG@k ties with the best
    one's (`tied_with_best`: not worse at 95%, within `TIE_REL`), the one with the best NDCG@k of the users
    whose target was made cold wins (exact ties: the larger bonus, then the larger imputation, then more
    slots, then the nearer neural place): of the rankings that cost this validation nothing measurable, the
    one that serves new items best (cold items are text, and text wins ties). The overall NDCG counts
    warm-target users too, so each cold item pushed up costs what it costs them; but a tenth of the items made
    cold gives more cold targets than next-item traffic usually has, so what the warm-target users pay can
    hide behind the made-cold users' gain.
    `frac` 0 makes no item cold: the cold targets are then the validation's own targets without an ID
    embedding (a validation built from held-out items, as `llmrec.eval.cold_choice` does for the cold
    protocol).
    tie_on "warm" judges the tie on the warm-target users' NDCG alone (a stricter rule, for measurement). The
    imputation grid is tried only where the ranking has a co-occurrence term (sim given, `cooc_weight` > 0);
    otherwise the model's value stays. Fewer than `min_targets` validation users with a made-cold target ->
    bonus 0, no slots or neural places and the imputation at 1 (the text-first default), not measured.
    Returns (bonus, summary for meta.json: measured, grid, impute_grid, every_grid, keep_grid, tie_on,
    cooc_impute, cold_every and cold_keep (chosen), val_ndcg, val_ndcg_warm_targets and val_ndcg_cold_targets
    (per bonus, at the other chosen values), val_ndcg_by_impute and val_ndcg_cold_targets_by_impute,
    val_ndcg_by_every and val_ndcg_cold_targets_by_every, val_ndcg_by_keep and val_ndcg_cold_targets_by_keep
    (each at the other chosen values), n_pseudo_cold_items, n_cold_targets, chosen).
    """
    if tie_on not in ("all", "warm"):
        raise ValueError(f"tie_on must be 'all' or 'warm', got {tie_on!r}")
    grid = [float(g) for g in grid]
    every = [int(e) for e in every_grid]
    keeps = [float(x) for x in keep_grid]
    places = [(e, x) for e in every for x in keeps]  # (slots, neural place) settings
    with_term = sim is not None and float(model.cfg.cooc_weight) > 0
    imp_grid = [float(f) for f in impute_grid] if with_term else [float(model.cfg.cooc_impute)]
    n = model.cfg.n_items
    warm = np.flatnonzero(model.id_slots.cpu().numpy() > 0)
    rng = np.random.default_rng(seed)
    pseudo = np.sort(rng.choice(warm, size=int(round(frac * len(warm))), replace=False))
    is_cold = np.zeros(n, dtype=bool)
    is_cold[pseudo] = True
    if frac == 0:  # the validation's own cold targets: items that never had an ID embedding
        is_cold |= model.id_slots.cpu().numpy() == 0
    cold_users = np.array([bool(is_cold[val.targets[b]].any()) for b in range(val.n_users)], dtype=bool)
    summary: dict[str, Any] = {"n_pseudo_cold_items": int(len(pseudo)),
                               "n_cold_targets": int(cold_users.sum()),
                               "grid": grid, "impute_grid": imp_grid, "every_grid": every, "keep_grid": keeps,
                               "frac": frac,
                               "seed": seed}
    if cold_users.sum() < max(min_targets, 2):
        why = (
            f"{int(cold_users.sum())} validation targets among the items made cold, fewer than {min_targets}"
        )
        return 0.0, {**summary, "measured": False, "why": why, "chosen": 0.0, "cold_every": 0,
                     "cold_keep": 0.0, "cooc_impute": 1.0 if with_term else float(model.cfg.cooc_impute)}
    keep = sp.diags((~is_cold).astype(np.float32))
    sim_c = (keep @ sim @ keep).tocsr() if sim is not None else None
    per = np.zeros((len(imp_grid), len(grid), len(places), val.n_users))
    saved_cfg = model.cfg
    try:
        with model.items_made_cold(pseudo):
            imputes = model.cooc_imputes(sim_c, imp_grid)  # the neighbours once, weighted per factor
            # the two-stage pass depends on the bonus only: one per bonus, each imputation and placement after
            for gi, g in enumerate(grid):
                model.cfg = dataclasses.replace(saved_cfg, cold_bonus=g)
                per[:, gi] = served_val_ndcg_grid(model, val, sim_c, imputes, places, n_candidates, k, chunk)
    finally:
        model.cfg = saved_cfg
    means, cold_means = per.mean(3), per[..., cold_users].mean(3)  # (F, G, P)
    # of the settings whose overall NDCG ties with the best one's, the best for the made-cold targets; exact
    # ties to the larger bonus, then the larger imputation, then more slots, then the nearer neural place
    judged = per.reshape(-1, val.n_users)
    judged = judged[:, ~cold_users] if tie_on == "warm" else judged
    tied = np.flatnonzero(tied_with_best(judged))

    def pull(pi: int) -> tuple[float, float]:
        e, x = places[pi]
        return (1.0 / e if e else 0.0, 1.0 / x if x else 0.0)  # cold slots per position, neural closeness

    fi, gi, pi = max((np.unravel_index(int(i), means.shape) for i in tied),
                     key=lambda t: (cold_means[t], grid[t[1]], imp_grid[t[0]], pull(int(t[2]))))
    pick, f_pick, (e_pick, k_pick) = grid[gi], imp_grid[fi], places[pi]
    by_e = {e: places.index((e, k_pick)) for e in every}
    by_k = {x: places.index((e_pick, x)) for x in keeps}
    return pick, {**summary, "measured": True, "chosen": pick, "cooc_impute": f_pick, "cold_every": e_pick,
                  "cold_keep": k_pick, "z": TEXT_BOOST_Z, "rel": TIE_REL, "tie_on": tie_on,
                  "val_ndcg": [float(x) for x in means[fi, :, pi]],
                  "val_ndcg_warm_targets": ([float(x) for x in per[fi, :, pi][:, ~cold_users].mean(1)]
                                            if (~cold_users).any() else None),  # None: every target cold
                  "val_ndcg_cold_targets": [float(x) for x in cold_means[fi, :, pi]],
                  "val_ndcg_by_impute": {f"{f:g}": means[i, :, pi].tolist() for i, f in enumerate(imp_grid)},
                  "val_ndcg_cold_targets_by_impute": {f"{f:g}": cold_means[i, :, pi].tolist()
                                                      for i, f in enumerate(imp_grid)},
                  "val_ndcg_by_every": {str(e): means[fi, :, j].tolist() for e, j in by_e.items()},
                  "val_ndcg_cold_targets_by_every": {str(e): cold_means[fi, :, j].tolist()
                                                     for e, j in by_e.items()},
                  "val_ndcg_by_keep": {f"{x:g}": means[fi, :, j].tolist() for x, j in by_k.items()},
                  "val_ndcg_cold_targets_by_keep": {f"{x:g}": cold_means[fi, :, j].tolist()
                                                    for x, j in by_k.items()}}


@torch.no_grad()
def served_val_ndcg(
    model: ScorerModel,
    val: sdata.ValidationSet,
    sim: sp.csr_matrix | None,
    impute: tuple[np.ndarray, np.ndarray] | None,
    n_candidates: int = 200,
    k: int = 10,
    chunk: int = 256,
) -> np.ndarray:
    """(U,) NDCG@k of every validation user under the final ranking as served: the two-stage scores plus
    `cooc_weight` x the co-occurrence score (sim, with `impute` for items without co-occurrence data) when
    both are there, with the model's cold-item slots and neural places."""
    place = (int(model.cfg.cold_every), float(model.cfg.cold_keep))
    return served_val_ndcg_grid(model, val, sim, [impute], [place], n_candidates, k,
                                chunk)[0, 0]


@torch.no_grad()
def served_val_ndcg_grid(
    model: ScorerModel,
    val: sdata.ValidationSet,
    sim: sp.csr_matrix | None,
    imputes: Sequence[tuple[np.ndarray, np.ndarray] | None],
    places: Sequence[tuple[int, float]],
    n_candidates: int = 200,
    k: int = 10,
    chunk: int = 256,
) -> np.ndarray:
    """(F, P, U) `served_val_ndcg` with each co-occurrence imputation of `imputes` (F) and each cold-item
    placement of `places` (P: (cold_every, cold_keep) pairs) in place of the model's: one two-stage pass
    (which neither changes), then the co-occurrence term F ways and the placements P ways."""
    out = np.zeros((len(imputes), len(places), val.n_users))
    w = float(model.cfg.cooc_weight)
    users = np.arange(val.n_users)
    cold_item = (model.id_slots == 0).cpu().numpy()
    for ub, _, cand, head in two_stage_chunks(model, val, users, max(n_candidates, k), chunk=chunk):
        base, cand_np = head.numpy(), cand.numpy()
        positives = [val.positives[b] for b in ub]
        for fi, impute in enumerate(imputes):
            f = base
            if sim is not None and w > 0:
                f = base + w * history_scores(sim, positives, cand_np, impute=impute)
            for j, (e, keep) in enumerate(places):
                fe = cold_slot_scores(f, cold_item[cand_np], e, keep, base)
                top = np.take_along_axis(cand_np, np.argsort(-fe, axis=1, kind="stable")[:, :k], axis=1)
                out[fi, j, ub] = [recall_ndcg(top[i], val.targets[b], k)[1] for i, b in enumerate(ub)]
    return out


def tied_with_best(per: np.ndarray, z: float = TEXT_BOOST_Z, rel: float = TIE_REL) -> np.ndarray:
    """bool (G,): the rows of per (G, U) (per-user scores of G rankings) that tie with the best row (highest
    mean): the mean paired difference is within z standard errors, and the mean within `rel` of the best's.
    The best row ties with itself."""
    per = np.asarray(per, dtype=np.float64)
    means = per.mean(1)
    best = int(np.argmax(means))
    diff = per - per[best]
    se = diff.std(1, ddof=1) / np.sqrt(per.shape[1]) if per.shape[1] > 1 else np.zeros(len(per))
    out = (diff.mean(1) >= -z * se) & (means >= (1.0 - rel) * means[best])
    out[best] = True
    return out


def largest_tied(
    per: np.ndarray, grid: Sequence[float], z: float = TEXT_BOOST_Z, rel: float = TIE_REL
) -> float:
    """The largest grid value whose per-user scores (row of per, (G, U)) tie with the best row's
    (`tied_with_best`)."""
    return float(max(g for g, t in zip(grid, tied_with_best(per, z, rel), strict=True) if t))


def cooc_counts(df: pd.DataFrame, items: ItemSpace) -> CoocCounts:
    """Item x item co-occurrence counts (llmrec.cooc) of the positive events of a canonical interactions
    frame."""
    df = attach_item_idx(df, items)
    df = df[sdata.target_mask(df)] if len(df) else df
    counts = CoocCounts(items.n_items)
    counts.add([g.to_numpy(np.int64) for _, g in df.groupby(df[USER_ID].astype(str), sort=False)["item_idx"]])
    return counts


def cooc_matrix(df: pd.DataFrame, items: ItemSpace, n_neighbors: int, term: str = ITEMKNN) -> sp.csr_matrix:
    """The named co-occurrence term ("itemknn" or an EASE term, llmrec.cooc) of the positive events of a
    canonical interactions frame."""
    return cooc_counts(df, items).matrix(term, n_neighbors)


@torch.no_grad()
def tune_behaviour(
    model: ScorerModel,
    val: sdata.ValidationSet,
    sims: Mapping[str, sp.csr_matrix],
    n_candidates: int = 200,
    k: int = 10,
    grid: Iterable[float] = COOC_GRID,
    chunk: int = 256,
) -> tuple[str, float, dict[str, dict[str, float]]]:
    """The co-occurrence term and weight with the best validation ndcg@k of the final ranking.

    Final ranking (as in `Scorer.recommend`): retrieval top-n_candidates by u.v (train items excluded), scored
    by `model.rank_pairs` + w * the term's score of the user's positive train items (`history_scores`).
    `grid` is in logit units; with the re-ranker off rank_pairs is u.v, so the weights tried are grid / scale.
    Ties go to the earlier term in `sims`, then to the smaller weight (weight 0 is the same ranking for every
    term, so it goes to the first). Items without co-occurrence data borrow their text neighbours' scores as
    the model's `cooc_impute` says. Returns (term, weight, {term: {weight: ndcg@k}}).
    """
    if not sims:
        raise ValueError("tune_behaviour needs at least one co-occurrence term")
    scale = float(model.scale)
    if not math.isfinite(scale) or scale <= 0.0:
        raise TrainingDiverged(f"the trained scale (inverse temperature) is {scale}; lower the learning rate")
    unit = 1.0 if model.cfg.rerank else 1.0 / scale
    weights = [float(g) * unit for g in grid]
    names = list(sims)
    imputes = {t: model.cooc_impute(sims[t]) for t in names}
    sums = np.zeros((len(names), len(weights)))
    users = np.arange(val.n_users)
    for ub, _, cand, head in two_stage_chunks(model, val, users, max(n_candidates, k), chunk=chunk):
        base, cand_np = head.numpy(), cand.numpy()  # base is -inf at excluded candidates
        pos = [val.positives[b] for b in ub]
        for ti, t in enumerate(names):
            co = history_scores(sims[t], pos, cand_np, impute=imputes[t])  # (b, n)
            for wi, w in enumerate(weights):
                f = base + w * co
                top = np.take_along_axis(cand_np, np.argsort(-f, axis=1, kind="stable")[:, :k], axis=1)
                sums[ti, wi] += sum(recall_ndcg(top[j], val.targets[b], k)[1] for j, b in enumerate(ub))
    ndcg = sums / max(val.n_users, 1)
    ti, wi = np.unravel_index(int(np.argmax(ndcg)), ndcg.shape)  # first maximum in (term, weight) order
    tables = {t: {f"{w:.6g}": float(x) for w, x in zip(weights, ndcg[i], strict=True)}
              for i, t in enumerate(names)}
    return names[int(ti)], weights[int(wi)], tables
