"""The learning loop: fine-tune the serving scorer on new feedback, evaluate it, swap it in only when not
worse.

`learn(run_dir, events_dir)` (the core of `llmrec learn` / `python -m jobs.learn`):

1. The current model: the registry's current scorer (`RUN/models.json`), else RUN/scorer. Its meta's
   `data_ts_max` is the newest event it learned from.
2. The data: RUN/data's interactions plus the serving event log (`state.event_log.read_events`). New events =
   those after `data_ts_max`. Fewer than `min_new_events` -> nothing to do.
3. Held back: the newest `holdback_frac` of the new events (by time) are kept out of training.
4. Fine-tune: `fit_scorer(init_from=current, focus_after_ts=data_ts_max, epochs, max_steps)` on everything up
   to the hold-back cut: the current weights (ID embeddings carried over by item id), every sample whose
   target is new plus as many older ones, a bounded number of steps; the co-occurrence matrix is rebuilt from
   all of it (so items that were cold get their first co-occurrences).
5. Evaluate both models on the held-back events, the same way: for every held-back event that is not negative
   feedback, on an item the user had not touched, the user's history up to it (training events + earlier
   held-back ones), full-catalog next-item NDCG@10 (`Scorer.full_scores`, the serving ranking). Accept the
   candidate only when its mean is not below the current model's.
6. Accepted: the registry's current entry becomes the candidate (the previous stays in `history`, so
   `rollback` restores it). A running Serve app notices the registry's change and swaps the new scorer in
   through its `reconfigure` path (`Recommender`), so no redeploy is needed. Refused: the candidate folder
   is kept for inspection, nothing changes.

The registry `RUN/models.json`: {"current": entry, "history": [older entries, newest last]}, entry =
{scorer_dir, version, created_at, why, metrics}. Written atomically.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from llmrec import schema
from llmrec.config import HELD_OUT_KINDS, TrainConfig, config_from_dict, with_overrides

logger = logging.getLogger(__name__)

REGISTRY_FILE = "models.json"
SCORERS_DIR = "scorers"  # RUN/scorers/<stamp>/: the scorers the learning loop trained


# --------------------------------------------------------------------------------------------- registry
def read_registry(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The model registry of a run (None when the learning loop never wrote one)."""
    p = Path(run_dir) / REGISTRY_FILE
    if not p.is_file():
        return None
    reg = json.loads(p.read_text())
    if not isinstance(reg, dict) or "current" not in reg or not isinstance(reg.get("history", []), list):
        raise ValueError(f"{p} is not a model registry (expected {{current, history}}); delete it to reset")
    return reg


def current_scorer(run_dir: str | os.PathLike) -> tuple[str | None, str]:
    """(scorer folder that serves by the registry, why), or (None, reason) without a registry."""
    reg = read_registry(run_dir)
    if reg is None:
        return None, "no model registry"
    cur = reg["current"]
    return str(cur["scorer_dir"]), str(cur.get("why", ""))


def set_current(
    run_dir: str | os.PathLike, scorer_dir: str | os.PathLike, why: str, metrics: dict | None = None
) -> dict[str, Any]:
    """Make `scorer_dir` the current model (the previous one goes to history); returns the registry."""
    from llmrec.artifacts import read_meta

    meta = read_meta(scorer_dir, stage="train")  # refuse anything that is not a trained scorer
    reg = read_registry(run_dir)
    if reg is None:  # the first registry: what served before it (RUN/scorer) becomes its first history entry
        reg = {"current": None, "history": []}
        default = Path(run_dir) / schema.RUN_SCORER
        if (default / schema.META_FILE).is_file() and default.resolve() != Path(scorer_dir).resolve():
            reg["history"].append(
                {
                    "scorer_dir": str(default.resolve()),
                    "version": read_meta(default, stage="train").get("created_at"),
                    "created_at": time.time(),
                    "why": "served before the model registry existed",
                    "metrics": {},
                }
            )
    if reg["current"] is not None:
        reg["history"].append(reg["current"])
    reg["current"] = {
        "scorer_dir": str(Path(scorer_dir).resolve()),
        "version": meta.get("created_at"),
        "created_at": time.time(),
        "why": why,
        "metrics": metrics or {},
    }
    _write_registry(run_dir, reg)
    logger.info("model registry of %s: current = %s (%s)", run_dir, scorer_dir, why)
    return reg


def rollback(run_dir: str | os.PathLike, why: str = "rollback") -> dict[str, Any]:
    """Make the previous model current again (the rolled-back one is kept in history)."""
    reg = read_registry(run_dir)
    if reg is None or not reg["history"]:
        raise ValueError(f"{run_dir} has no previous model to roll back to")
    prev = reg["history"].pop()
    reg["history"].append(reg["current"])
    reg["current"] = {**prev, "created_at": time.time(), "why": f"{why} (back to {prev['scorer_dir']})"}
    _write_registry(run_dir, reg)
    return reg


def _write_registry(run_dir: str | os.PathLike, reg: dict[str, Any]) -> None:
    from llmrec.storage import write_bytes  # atomic on a local disk (temp file + rename)

    write_bytes(Path(run_dir) / REGISTRY_FILE, (json.dumps(reg, indent=2) + "\n").encode())


# --------------------------------------------------------------------------------------------- learning
# how a round makes the post-training choices (`learn(choices=)`, `llmrec learn --choices`)
LEARN_CHOICES = ("refit", "reuse")


@dataclass
class LearnResult:
    accepted: bool
    why: str
    current_dir: str
    candidate_dir: str | None = None
    n_new_events: int = 0
    n_heldout_targets: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def learn(
    run_dir: str | os.PathLike,
    events: pd.DataFrame | str | os.PathLike | None = None,
    *,
    data_dir: str | os.PathLike | None = None,
    base: pd.DataFrame | None = None,
    epochs: int = 1,
    max_steps: int | None = 200,
    holdback_frac: float = 0.2,
    min_new_events: int = 20,
    seed: int = 0,
    num_workers: int = 1,
    lr: float | None = None,
    choices: str = "refit",
    **train_kwargs: Any,
) -> LearnResult:
    """One round of the learning loop (module docstring).

    Args:
        run_dir: the run (data/, embeddings/, scorer/ or a registry).
        events: the serving event log folder, or a canonical interactions frame of new events (replay).
        data_dir: the prepared data folder: items, and the interactions the current model learned from
            (default RUN/data).
        base: those interactions as a frame instead of data_dir's (replay: the events before its cutoff).
        epochs, max_steps, lr: the fine-tune's budget (batches per epoch at most) and learning rate (default:
            the current model's).
        holdback_frac: share of the new events (newest first) held back to judge the candidate.
        min_new_events: fewer new events than this -> no training.
        choices: "refit" = the candidate makes its post-training choices (co-occurrence term and weight, text
            boosts, cold-item choices) again on its validation users (about half of a round's time; a current
            model's held-out cold-item choice, `TrainConfig.cold_choice`, is carried over); "reuse"
            = it keeps the current model's (`finalize_ranking(reuse=)`): rounds in 0.55x the time, lists a
            little worse on Magazine's replay (README, "Keeps learning from live feedback").
    """
    from llmrec.artifacts import read_meta
    from llmrec.data.tables import read_interactions, read_items
    from llmrec.embed.artifact import load_item_space
    from llmrec.scorer.finalize import TrainingDiverged
    from llmrec.scorer.train import fit_scorer

    t0 = time.perf_counter()
    if not 0.0 < holdback_frac < 1.0:
        raise ValueError(f"holdback_frac must be in (0, 1), got {holdback_frac}")
    if choices not in LEARN_CHOICES:
        raise ValueError(f"choices must be one of {', '.join(LEARN_CHOICES)}, got {choices!r}")
    run = Path(run_dir)
    cur_dir, _ = current_scorer(run)
    cur_dir = cur_dir or str(run / schema.RUN_SCORER)
    meta = read_meta(cur_dir, stage="train")
    ts_max = meta.get("data_ts_max")
    if ts_max is None:
        raise ValueError(f"{cur_dir}/meta.json has no data_ts_max (trained by an older version); re-train it")
    data = Path(data_dir) if data_dir else run / schema.RUN_DATA
    base = read_interactions(data) if base is None else base
    if events is None:
        log = base.iloc[:0]
    elif isinstance(events, pd.DataFrame):
        log = events
    else:
        from llmrec.state.event_log import read_events

        log = read_events(events)
    cols = [schema.USER_ID, schema.ITEM_ID, schema.TS, schema.RATING, schema.EVENT]
    allev = pd.concat([base[cols], log[cols]], ignore_index=True)
    new = allev[allev[schema.TS] > int(ts_max)].sort_values(schema.TS, kind="mergesort")
    res = LearnResult(accepted=False, why="", current_dir=cur_dir, n_new_events=len(new))
    if len(new) < min_new_events:
        res.why = (
            f"{len(new)} new events since the current model (ts > {ts_max}) < min_new_events {min_new_events}"
        )
        res.seconds = time.perf_counter() - t0
        return res
    cut = int(np.quantile(new[schema.TS].to_numpy(), 1.0 - holdback_frac, method="lower"))
    if cut <= int(ts_max) or (new[schema.TS] > cut).sum() == 0:
        cut = int(new[schema.TS].iloc[len(new) // 2])
    train_ev = allev[allev[schema.TS] <= cut]
    held = new[new[schema.TS] > cut]
    items, embed_meta = load_item_space(run / schema.RUN_EMBEDDINGS, read_items(data))
    # the current model's settings (meta.json "config" = its TrainConfig) that a fine-tune keeps; the rest are
    # TrainConfig's defaults, then this round's budget and the caller's overrides on top
    saved = dict(meta.get("config", {}))
    keep = {"batch_size", "patience", "dim", "max_len", "n_neg", "cooc_neighbors", "cooc_kind", "val_users",
            "feedback_p", "lr", "cold_choice"}
    kept = {k: v for k, v in saved.items() if k in keep}
    base = config_from_dict(TrainConfig, kept, f"{cur_dir}/meta.json")
    budget = {"epochs": epochs, "seed": seed, "num_workers": num_workers, "max_steps": max_steps}
    if lr is not None:
        budget["lr"] = lr
    cfg = with_overrides(base, {**budget, **train_kwargs}, "learn()")
    out = run / SCORERS_DIR / time.strftime("%Y%m%d-%H%M%S")
    cold_pick = None
    if cfg.cold_choice in HELD_OUT_KINDS and choices == "refit":
        # choosing again on held-out items would train a second model, beyond a round's bounded time: the
        # current model's held-out choice is carried over (its other choices are made again)
        from llmrec.scorer.finalize import COLD_CHOICES

        mc = meta.get("model_config", {})
        cold_pick = ({k: mc[k] for k in COLD_CHOICES}, {"carried_from": cur_dir})
    try:
        fit_scorer(
            cfg, train_ev, items, out, embed_meta=embed_meta, init_from=cur_dir, focus_after_ts=int(ts_max),
            reuse_choices_from=cur_dir if choices == "reuse" else None, cold_pick=cold_pick,
        )
    except TrainingDiverged as e:  # a fine-tune that cannot rank is refused like a worse one
        res.why = f"fine-tune diverged: {e}"
        res.seconds = time.perf_counter() - t0
        logger.warning("learn: %s -> refused", res.why)
        return res
    res.candidate_dir = str(out)
    res.metrics = judge(cur_dir, str(out), train_ev, held, items)
    res.n_heldout_targets = int(res.metrics["n_targets"])
    c, n = res.metrics["candidate"]["ndcg@10"], res.metrics["current"]["ndcg@10"]
    res.accepted = res.metrics["n_targets"] > 0 and c >= n
    res.why = (
        f"held-back NDCG@10 {c:.4f} vs current {n:.4f} on {res.n_heldout_targets} targets from "
        f"{len(held)} held-back events"
    )
    if res.accepted:
        set_current(run, out, f"learn: {res.why}", res.metrics)
    res.seconds = time.perf_counter() - t0
    logger.info("learn: %s -> %s", res.why, "accepted" if res.accepted else "refused")
    return res


def judge(
    cur_dir: str, cand_dir: str, train_ev: pd.DataFrame, held: pd.DataFrame, items: Any
) -> dict[str, Any]:
    """Next-item NDCG@10 / recall@10 of both scorers on the held-back events (module docstring, step 5)."""
    from llmrec.metrics import bootstrap_ci, recall_ndcg
    from llmrec.scorer.inference import Scorer

    pos = {iid: i for i, iid in enumerate(np.asarray(items.item_ids).astype(str))}
    targets, hists = _heldout_targets(train_ev, held, pos)
    out: dict[str, Any] = {"n_targets": len(targets)}
    per = {}
    for name, d in (("current", cur_dir), ("candidate", cand_dir)):
        s = Scorer.load(d)
        if list(s.item_ids) != list(np.asarray(items.item_ids).astype(str)):
            raise ValueError(f"{d} ranks another catalog than the run's embeddings; re-train it on them")
        nd, rc = [], []
        for b in range(0, len(hists), 256):
            sc = s.full_scores(hists[b : b + 256])
            for j, h in enumerate(hists[b : b + 256]):
                row = sc[j].copy()
                row[np.unique(h.item_idx)] = -np.inf
                top = np.argsort(-row, kind="stable")[:10]
                r, n = recall_ndcg(top, np.array([targets[b + j]]), 10)
                nd.append(n)
                rc.append(r)
        per[name] = np.asarray(nd)
        out[name] = {
            "ndcg@10": float(np.mean(nd)) if nd else 0.0,
            "recall@10": float(np.mean(rc)) if rc else 0.0,
        }
    if len(targets):
        out["diff_ci95"] = list(bootstrap_ci(per["candidate"], per["current"]))
    return out


def _heldout_targets(
    train_ev: pd.DataFrame, held: pd.DataFrame, pos: dict[str, int]
) -> tuple[list[int], list]:
    """Targets: held-back events (not dislike/skip) on a catalog item the user had not touched; each with the
    user's history (catalog items only) up to it, in the one event order (`llmrec.data.order.sort_events`,
    seed 0: the order the scorer was trained in)."""
    from llmrec.data.order import sort_events
    from llmrec.protocol import History

    allev = pd.concat([train_ev, held], ignore_index=True)
    allev = allev[allev[schema.ITEM_ID].astype(str).isin(pos)]
    cut = held[schema.TS].min() if len(held) else np.inf
    # only a user with an event at or after the cut has a target: the others' histories are not built (the
    # tie order is a function of each event's own columns, so the subset sorts as it would in the whole)
    allev = sort_events(allev[allev[schema.USER_ID].isin(allev.loc[allev[schema.TS] >= cut, schema.USER_ID])])
    targets, hists = [], []
    for uid, g in allev.groupby(schema.USER_ID, sort=False):
        idx = np.array([pos[str(i)] for i in g[schema.ITEM_ID]], np.int64)
        ts = g[schema.TS].to_numpy(np.int64)
        ev = g[schema.EVENT].astype(str).to_numpy()
        rt = g[schema.RATING].to_numpy(np.float64, na_value=np.nan)
        for t in np.flatnonzero(ts >= cut):
            # a target as in training and evaluation: any event that is not negative feedback
            if t == 0 or ev[t] in schema.NEGATIVE_KINDS or idx[t] in idx[:t]:
                continue
            targets.append(int(idx[t]))
            hists.append(History(str(uid), idx[:t], ts[:t], ev[:t], rt[:t]))
    return targets, hists
