"""Offline evaluation: split the canonical interactions, fit every model on train, rank the whole catalog.

`evaluate(data_dir, embeddings_dir, out_dir, ...)` runs each protocol ("loo" = leave-last-out, "time" = global
time cutoff, "cold" = held-out items; see `llmrec.eval.split`; default loo and time) over every model
(llmrec's scorer when importable, reported as served ("llmrec") and without its co-occurrence term
("llmrec_neural", the same fit); the baselines of `llmrec.eval.baselines`, plus `extra_models`), and writes
to `out_dir`:

- `metrics.json`: `{"loo": {...}, "time": {...}, "cold": {...}}`, one object per protocol that was run, each
  EXACTLY `{"dataset", "protocol", "n_users", "n_items", "models": {name: {recall@10, recall@20, ndcg@10,
  ndcg@20, mrr, coverage@10}}, "cold_items": {"n_events": int, "models": {name: {...same keys...}}},
  "repeat_targets_removed": int, "ci95": {name: [lo, hi]}, "diff_vs_llmrec_ci95": {name: [lo, hi]}}`.
  `ci95`: 95% bootstrap interval (2,000 resamples of the test users, seeded) of each model's NDCG@10;
  `diff_vs_llmrec_ci95`: the paired interval of (model - llmrec) NDCG@10 (empty without llmrec).
  `n_users` = test users evaluated, `n_items` = catalog size N (every item is rankable, cold ones included).
  `cold_items` holds the metrics restricted to test targets whose item never occurs in train (only the users
  with such a target, and only those targets); its `models` is `{}` when `n_events` is 0. Under "cold" every
  target is a held-out item, so its `cold_items` block equals its main block (`n_events` = all targets), and
  `repeat_targets_removed` is 0 (held-out items are in no history).
- `metrics_<protocol>.json`: the same single-protocol object, one file per protocol (for scripts).
- `per_user.parquet`: user_id, protocol, model, rank (1-based rank of the user's best-ranked target), ndcg@10.
- `report.md`, `metrics.png` (see `llmrec.eval.report`), and `meta.json` (stage "evaluate": split stats,
  per-model fit/score seconds, skipped models, dropped events, embedding model).

Choices: the ItemSpace is the embeddings artifact (rows in its order). Interactions on items without an
embedding are dropped with a WARNING and counted in meta (`n_events_without_embedding`). At test time a user's
history is `split.history` (loo: all events before the test event; time: all events up to the cutoff; cold:
all events on items that are not held out) and the items in it are excluded from the ranking (the target
never is). `max_test_users` samples test users with `seed` (sorted ids, numpy default_rng) so runs are
reproducible.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from llmrec.artifacts import write_meta
from llmrec.eval.baselines import BASELINES, make_baseline
from llmrec.eval.metrics import RankingMetrics, bootstrap_ci
from llmrec.eval.protocol import History, ItemSpace, Recommender
from llmrec.eval.split import Split, cold_item_split, leave_last_out, sort_events, time_split
from llmrec.schema import (
    EVENT,
    FACETS,
    INTERACTIONS_FILE,
    ITEM_ID,
    ITEMS_FILE,
    META_FILE,
    RATING,
    RUN_SCORER,
    TS,
    USER_ID,
)

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MODELS",
    "DEFAULT_PROTOCOLS",
    "PROTOCOLS",
    "attach_item_idx",
    "evaluate",
    "evaluate_models",
    "load_item_space",
    "make_histories",
    "read_tables",
]

PER_USER_FILE = "per_user.parquet"  # user_id, protocol, model, rank (best target), ndcg@10
PROTOCOLS = ("loo", "time", "cold")
DEFAULT_PROTOCOLS = ("loo", "time")  # what `llmrec evaluate` and the pipeline run unless told otherwise
DEFAULT_MODELS = ("llmrec",) + BASELINES
ITEM_IDX = "item_idx"


def evaluate(
    data_dir: str | os.PathLike,
    embeddings_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    protocols: Sequence[str] = DEFAULT_PROTOCOLS,
    models: Sequence[str] | None = None,
    extra_models: Sequence[Recommender] = (),
    max_test_users: int | None = None,
    seed: int = 0,
    scorer_dir: str | os.PathLike | None = None,
    llmrec_kwargs: dict[str, Any] | None = None,
    baseline_kwargs: dict[str, dict[str, Any]] | None = None,
    time_test_frac: float = 0.1,
    time_cutoff_ts: int | None = None,
    time_targets: str = "first",
    cold_frac: float = 0.1,
    batch_users: int = 1024,
) -> dict[str, Any]:
    """Evaluate models under each protocol and write metrics.json, report.md, metrics.png, meta.json.

    Args:
        data_dir: the `llmrec prepare` folder (items.parquet, interactions.parquet).
        embeddings_dir: the `llmrec embed` folder; defines the item space.
        out_dir: where the evaluation artifacts go (created).
        protocols: subset of PROTOCOLS ("loo", "time", "cold"); default ("loo", "time").
        models: names from DEFAULT_MODELS (None = all; "llmrec" is skipped with a log line when its module
            is not importable).
        extra_models: further Recommender instances (their `name` becomes the metrics key).
        max_test_users: evaluate at most this many test users per protocol (seeded sample).
        seed: seeds model training, the user sample and the cold protocol's held-out items.
        scorer_dir: the run's `llmrec train` folder (default: embeddings_dir/../scorer); llmrec is
            retrained on each split's train with the settings in its meta.json (see `llmrec_train_config`).
        llmrec_kwargs: overrides for `LLMRecRecommender(**kwargs)` (epochs, num_workers, n_candidates, ...).
        baseline_kwargs: per-baseline constructor overrides, e.g. {"sasrec": {"epochs": 5}}.
        time_test_frac: share of events after the time protocol's cutoff.
        time_cutoff_ts: explicit time-protocol cutoff (events with ts <= it are train); overrides
            time_test_frac.
        time_targets: "first" post-cutoff event per test user (default) or "all" distinct post-cutoff items.
        cold_frac: share of the items (with events) the cold protocol holds out.
        batch_users: users scored per `score` call.

    Returns:
        `{protocol: metrics object}`, exactly what metrics.json holds.
    """
    t_all = time.perf_counter()
    bad = [p for p in protocols if p not in PROTOCOLS]
    if bad or not protocols:
        raise ValueError(f"protocols must be a non-empty subset of {list(PROTOCOLS)}, got {list(protocols)}")
    names = list(DEFAULT_MODELS if models is None else models)
    unknown = [m for m in [*names, *(baseline_kwargs or {})] if m not in DEFAULT_MODELS]
    if unknown:
        raise ValueError(
            f"unknown model(s) {unknown}; choose from {list(DEFAULT_MODELS)} (or pass extra_models)"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    items_df, inter = read_tables(data_dir)
    space, embed_meta = load_item_space(embeddings_dir, items_df)
    inter, n_dropped = attach_item_idx(inter, space)
    dataset = _dataset_name(data_dir)
    scorer_dir = Path(scorer_dir) if scorer_dir is not None else Path(embeddings_dir).parent / RUN_SCORER

    results: dict[str, Any] = {}
    per_user_frames: list[pd.DataFrame] = []
    meta_protocols: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for proto in protocols:
        if proto == "loo":
            split = leave_last_out(inter)
        elif proto == "cold":
            split = cold_item_split(inter, frac=cold_frac, seed=seed)
        else:
            split = time_split(
                inter,
                test_frac=time_test_frac,
                cutoff_ts=time_cutoff_ts,
                targets=time_targets,  # type: ignore[arg-type]
            )
        recs: list[Recommender] = []
        for name in names:
            model = _make_model(
                name, seed, scorer_dir, llmrec_kwargs, (baseline_kwargs or {}).get(name, {}), skipped
            )
            if model is not None:
                recs.append(model)
                if hasattr(model, "neural_only"):  # llmrec without its co-occurrence term, same fit
                    recs.append(model.neural_only())
        recs.extend(extra_models)
        res, timings, n_users = evaluate_models(split, space, recs, max_test_users, seed, batch_users)
        ci, diff_ci = intervals(res["per_user"]["models"], seed=seed)
        results[proto] = {
            "dataset": dataset,
            "protocol": proto,
            "n_users": n_users,
            "n_items": space.n_items,
            "models": res["models"],
            "cold_items": res["cold_items"],
            "repeat_targets_removed": res["repeat_targets_removed"],
            "ci95": ci,
            "diff_vs_llmrec_ci95": diff_ci,
        }
        per_user_frames.append(_per_user_frame(proto, res["per_user"]))
        meta_protocols[proto] = {"split": split.stats, "timings": timings, "n_test_users_evaluated": n_users}
        (out / f"metrics_{proto}.json").write_text(json.dumps(results[proto], indent=2) + "\n")

    (out / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    pd.concat(per_user_frames, ignore_index=True).to_parquet(out / PER_USER_FILE, index=False)
    from llmrec.eval.report import write_report

    write_report(results, {p: m["timings"] for p, m in meta_protocols.items()}, out, skipped=skipped)
    write_meta(
        out,
        "evaluate",
        dataset=dataset,
        protocols=list(protocols),
        models=[m.name for m in recs],
        skipped_models=skipped,
        max_test_users=max_test_users,
        seed=seed,
        time_test_frac=time_test_frac,
        time_cutoff_ts=time_cutoff_ts,
        time_targets=time_targets,
        cold_frac=cold_frac,
        n_events=len(inter),
        n_events_without_embedding=n_dropped,
        embed={k: embed_meta.get(k) for k in ("model_name", "dim", "n_items", "dataset_fingerprint")},
        per_protocol=meta_protocols,
        wall_s=round(time.perf_counter() - t_all, 2),
    )
    logger.info(
        "evaluation of %d model(s) x %d protocol(s) written to %s in %.1fs",
        len(recs),
        len(protocols),
        out,
        time.perf_counter() - t_all,
    )
    return results


def evaluate_models(
    split: Split,
    space: ItemSpace,
    models: Sequence[Recommender],
    max_test_users: int | None = None,
    seed: int = 0,
    batch_users: int = 1024,
) -> tuple[dict[str, Any], dict[str, dict[str, float]], int]:
    """Fit each model on `split.train`, score the test users in batches, compute all and cold-item metrics.

    Returns:
        ({"models": {name: metrics}, "cold_items": {"n_events", "models"}, "repeat_targets_removed": int,
          "per_user": {"users": (U,), "models": {name: {"rank": (U,), "ndcg@10": (U,)}}}},
         {name: timings}, n_test_users). Test targets already in the user's history are removed (counted).
    """
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise ValueError(f"model names must be unique (they key metrics.json), got {names}")
    test = split.test
    users = np.array(sorted(test[USER_ID].unique()), dtype=object)
    if max_test_users is not None and len(users) > max_test_users:
        users = np.sort(np.random.default_rng(seed).choice(users, size=max_test_users, replace=False))
        test = test[test[USER_ID].isin(set(users))]
    if len(users) == 0:
        raise ValueError(
            f"{split.protocol} split has no test users; the data set is too small for this protocol"
        )
    by_user = {u: g for u, g in test.groupby(USER_ID, sort=False)}
    targets = [np.unique(by_user[u][ITEM_IDX].to_numpy()) for u in users]
    cold_t = [np.unique(by_user[u].loc[by_user[u]["is_cold"], ITEM_IDX].to_numpy()) for u in users]
    histories = make_histories(split.history, users)
    exclude = [np.unique(h.item_idx) for h in histories]
    # A test target the user already has in their history (a repeat purchase / re-rating) is one of the
    # excluded items, so no model may recommend it. Keeping it would reward models that score history items
    # (the baselines' raw scores do; llmrec's two-stage scores never rank them): 9.8% of Magazine's loo
    # targets are repeats, worth ~+0.09 NDCG@10 to the zero-shot text model. They are removed and counted.
    n_targets_before = int(sum(len(t) for t in targets))
    targets = [np.setdiff1d(t, e, assume_unique=True) for t, e in zip(targets, exclude)]
    cold_t = [np.setdiff1d(c, e, assume_unique=True) for c, e in zip(cold_t, exclude)]
    n_repeat = n_targets_before - int(sum(len(t) for t in targets))
    keep = [i for i, t in enumerate(targets) if len(t)]
    if n_repeat:
        logger.info(
            "%s: %d of %d test targets are already in the user's history (excluded from ranking); removed, "
            "leaving %d of %d test users", split.protocol, n_repeat, n_targets_before, len(keep), len(users)
        )
    users = users[keep]
    targets, cold_t = [targets[i] for i in keep], [cold_t[i] for i in keep]
    histories, exclude = [histories[i] for i in keep], [exclude[i] for i in keep]
    if len(users) == 0:
        raise ValueError(f"{split.protocol} split: every test target is a repeat of a history item")
    n_cold = int(sum(len(c) for c in cold_t))

    out_models: dict[str, Any] = {}
    out_cold: dict[str, Any] = {}
    per_user: dict[str, dict[str, np.ndarray]] = {}
    timings: dict[str, dict[str, float]] = {}
    for model in models:
        t0 = time.perf_counter()
        model.fit(split.train, space)
        fit_s = time.perf_counter() - t0
        acc, acc_cold = RankingMetrics(space.n_items), RankingMetrics(space.n_items)
        t1 = time.perf_counter()
        for s in range(0, len(users), batch_users):
            sl = slice(s, s + batch_users)
            scores = np.asarray(model.score(histories[sl]), dtype=np.float32)  # (b, N)
            if scores.shape != (len(histories[sl]), space.n_items):
                raise ValueError(
                    f"{model.name}.score returned shape {scores.shape}, "
                    f"expected ({len(histories[sl])}, {space.n_items})"
                )
            acc.update(scores, targets[sl], exclude[sl])
            rows = [i for i, c in enumerate(cold_t[sl]) if len(c)]
            if rows:
                acc_cold.update(scores[rows], [cold_t[sl][i] for i in rows], [exclude[sl][i] for i in rows])
        score_s = time.perf_counter() - t1
        out_models[model.name] = acc.result()
        per_user[model.name] = {"rank": acc.per_user("rank"), "ndcg@10": acc.per_user("ndcg@10")}
        if n_cold:
            out_cold[model.name] = acc_cold.result()
        timings[model.name] = {
            "fit_s": round(fit_s, 3),
            "score_s": round(score_s, 3),
            "users_per_s": round(len(users) / max(score_s, 1e-9), 1),
        }
        logger.info(
            "%s [%s]: fit %.1fs, scored %d users in %.1fs; recall@10=%.4f ndcg@10=%.4f mrr=%.4f",
            model.name,
            split.protocol,
            fit_s,
            len(users),
            score_s,
            out_models[model.name]["recall@10"],
            out_models[model.name]["ndcg@10"],
            out_models[model.name]["mrr"],
        )
    return (
        {
            "models": out_models,
            "cold_items": {"n_events": n_cold, "models": out_cold},
            "repeat_targets_removed": n_repeat,
            "per_user": {"users": users, "models": per_user},
        },
        timings,
        len(users),
    )


def intervals(
    per_user: dict[str, dict[str, np.ndarray]], seed: int = 0, metric: str = "ndcg@10"
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """95% bootstrap intervals over test users of each model's mean `metric`, and of each model's paired
    difference to llmrec (model - llmrec; users resampled together) when llmrec was evaluated."""
    ci = {m: list(bootstrap_ci(v[metric], seed=seed)) for m, v in per_user.items()}
    diff = {}
    if "llmrec" in per_user:
        ref = per_user["llmrec"][metric]
        diff = {m: list(bootstrap_ci(v[metric], ref, seed=seed)) for m, v in per_user.items() if m != "llmrec"}
    return ci, diff


def _per_user_frame(protocol: str, per_user: dict[str, Any]) -> pd.DataFrame:
    users = np.asarray(per_user["users"], dtype=object)
    frames = [
        pd.DataFrame({USER_ID: users, "protocol": protocol, "model": name, "rank": v["rank"],
                      "ndcg@10": v["ndcg@10"]})
        for name, v in per_user["models"].items()
    ]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def read_tables(data_dir: str | os.PathLike) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(items, interactions) of a prepare folder, via llmrec.data.tables when available."""
    try:
        from llmrec.data.tables import read_interactions, read_items
    except ImportError:  # the tables module is optional for this stage
        read_items = read_interactions = None
    if read_items is not None and read_interactions is not None:
        return read_items(data_dir), read_interactions(data_dir)
    d = Path(data_dir)
    for f in (ITEMS_FILE, INTERACTIONS_FILE):
        if not (d / f).is_file():
            raise FileNotFoundError(f"{d / f} not found; pass the folder written by `llmrec prepare`")
    return pd.read_parquet(d / ITEMS_FILE), pd.read_parquet(d / INTERACTIONS_FILE)


def load_item_space(
    embeddings_dir: str | os.PathLike, items: pd.DataFrame | None = None
) -> tuple[ItemSpace, dict]:
    """ItemSpace from an embed folder (rows in embeddings order) with titles from `items` when given."""
    from llmrec.embed.artifact import load_embeddings

    emb = load_embeddings(embeddings_dir)
    ids, vecs, meta = emb.item_ids, emb.vectors, emb.meta
    if len(set(ids)) != len(ids):
        raise ValueError(f"{embeddings_dir}: duplicate item ids in the embeddings; re-run `llmrec embed`")
    titles = facets = None
    if items is not None and "title" in items.columns:
        t = items.set_index(ITEM_ID)["title"]
        titles = t.reindex(ids).fillna("").astype(str).to_numpy(dtype=object)
    if items is not None and FACETS in items.columns:
        by_id = dict(zip(items[ITEM_ID].astype(str), items[FACETS], strict=True))
        facets = [list(by_id.get(str(i), [])) for i in ids]
    return ItemSpace(
        item_ids=np.asarray(ids, dtype=object), text_vectors=np.asarray(vecs, np.float32), titles=titles,
        facets=facets, text_model=text_model_of(meta),
    ), dict(meta)


def text_model_of(embed_meta: dict) -> str | None:
    """The encoder of an embeddings artifact as a concrete folder or hub name (the bundled MiniLM's folder for
    the default model), or None when the meta does not say (texts then cannot be encoded into its space)."""
    from llmrec.embed.encoder import DEFAULT_MODEL_NAME, default_model_path, model_for_meta

    model = model_for_meta(embed_meta)
    if model is None and embed_meta.get("model_name") == DEFAULT_MODEL_NAME:
        model = default_model_path()
    return model


def attach_item_idx(interactions: pd.DataFrame, items: ItemSpace) -> tuple[pd.DataFrame, int]:
    """Add `item_idx` (int64 index into `items`); events on items outside the space are dropped (logged).

    Returns:
        (interactions with item_idx, number of dropped events).
    """
    index = pd.Index(items.item_ids)
    idx = index.get_indexer(interactions[ITEM_ID])
    missing = idx < 0
    n_missing = int(missing.sum())
    if n_missing:
        ex = sorted(set(interactions.loc[missing, ITEM_ID].head(5)))
        logger.warning(
            "dropping %d of %d interactions on %d item(s) without an embedding (e.g. %s)",
            n_missing,
            len(interactions),
            interactions.loc[missing, ITEM_ID].nunique(),
            ex,
        )
    if n_missing == len(interactions):
        raise ValueError(
            "no interaction refers to an item of the embeddings; were they built from this data?"
        )
    out = interactions.loc[~missing].copy()
    out[ITEM_IDX] = idx[~missing].astype(np.int64)
    if RATING not in out.columns:
        out[RATING] = np.nan
    if EVENT not in out.columns:
        out[EVENT] = "view"
    return out.reset_index(drop=True), n_missing


def make_histories(events: pd.DataFrame, user_ids: Sequence[str]) -> list[History]:
    """One time-ordered `History` per requested user (empty when the user has no events), same order."""
    df = sort_events(events)
    u = df[USER_ID].to_numpy()
    starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]]) if len(u) else np.zeros(0, dtype=np.int64)
    ends = np.r_[starts[1:], len(u)]
    span = {u[s]: (s, e) for s, e in zip(starts, ends, strict=True)}
    idx = df[ITEM_IDX].to_numpy(np.int64)
    ts = df[TS].to_numpy(np.int64)
    ev = df[EVENT].to_numpy(dtype=object) if EVENT in df.columns else np.full(len(df), "view", dtype=object)
    rt = df[RATING].to_numpy(np.float64) if RATING in df.columns else np.full(len(df), np.nan)
    out = []
    for user in user_ids:
        s, e = span.get(user, (0, 0))
        out.append(History(user_id=str(user), item_idx=idx[s:e], ts=ts[s:e], event=ev[s:e], rating=rt[s:e]))
    return out


# ----------------------------------------------------------------------------------------------- helpers


def _dataset_name(data_dir: str | os.PathLike) -> str:
    meta_path = Path(data_dir) / META_FILE
    if meta_path.is_file():
        try:
            name = json.loads(meta_path.read_text()).get("dataset")
            if name:
                return str(name)
        except json.JSONDecodeError:
            pass
    return Path(data_dir).resolve().parent.name if Path(data_dir).name == "data" else Path(data_dir).name


def _make_model(
    name: str,
    seed: int,
    scorer_dir: Path,
    llmrec_kwargs: dict[str, Any] | None,
    kwargs: dict[str, Any],
    skipped: dict[str, str],
) -> Recommender | None:
    if name != "llmrec":
        return make_baseline(name, seed=seed, **kwargs)  # type: ignore[return-value]
    try:
        from llmrec.scorer.recommender import LLMRecRecommender
    except ImportError as e:
        skipped["llmrec"] = f"llmrec.scorer.recommender not importable: {e}"
        logger.warning("skipping model 'llmrec': %s", skipped["llmrec"])
        return None
    kwargs = {**llmrec_train_config(scorer_dir), **(llmrec_kwargs or {}), "seed": seed}
    logger.info("llmrec is retrained on each protocol's train split with %s", kwargs)
    return LLMRecRecommender(**kwargs)


def llmrec_train_config(scorer_dir: str | os.PathLike) -> dict[str, Any]:
    """Training settings of the run's scorer (scorer/meta.json "config"), to retrain it alike on a split.

    The run's own scorer was trained on every interaction, test events included, so evaluation never scores
    with it; it only borrows its settings. Returns {} when there is no scorer artifact.
    """
    path = Path(scorer_dir) / META_FILE
    if not path.is_file():
        logger.info("no %s: llmrec is retrained with fit_scorer defaults", path)
        return {}
    try:
        from llmrec.scorer.train import DEFAULTS
    except ImportError:
        DEFAULTS = {}  # noqa: N806
    cfg = json.loads(path.read_text()).get("config", {}) or {}
    keep = {"epochs", "batch_size", "lr", "patience", "num_workers", "use_gpu", *DEFAULTS}
    return {k: v for k, v in cfg.items() if k in keep}
