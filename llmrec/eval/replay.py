"""Replay measurement: how much does real-time feedback help the next recommendation?

`replay(run_dir, data_dir, ...)`:
1. Global time cutoff: `cutoff` = the (1 - test_frac) quantile of event timestamps (as `llmrec.eval.split`);
   events with ts <= cutoff are history, later ones are streamed in time order (ties: user, item, event),
   at most `max_events` of them (the earliest ones).
2. Every streamed user's state is initialised from their pre-cutoff events through the real update code
   (`llmrec.state.apply_event`, user vector by `MeanVectorizer`).
3. Before each streamed event the user's top-k (`k`=10, seen items excluded) is asked for twice:
   - online: the state that has absorbed every earlier streamed event of this user;
   - frozen: the state as of the cutoff (never updated).
   The event is a target when its item is in the catalog and the user has not touched it before (a seen
   item is excluded from recommendations, so it could never be hit); hit@k and NDCG@k (one relevant item:
   1 / log2(rank + 2)) are averaged over targets, for all targets and for positive ones (like / purchase /
   click / rating >= 4). Afterwards the event is applied to the online state only.
4. In-process (default): `RecommendCore` over the run's catalog + index (+ RUN/scorer when the served app
   would use it and it was trained only on events up to the cutoff: a scorer whose `data_ts_max` lies after
   the cutoff has learned from the replayed events, so the text user vector is replayed instead), no Ray. With
   `url`: the same through the HTTP API of a running `llmrec serve` (users are namespaced
   `replay-<tag>-on-<uid>` / `-fr-`, initial history posted in batches, deleted at the end).
5. With `learn_every` N (in-process, and a scorer trained on pre-cutoff events only): a third list per target,
   "learning": the online state ranked by the model the learning loop serves. Every N streamed events one
   round of `llmrec.learn.learn` runs on the events streamed so far (pre-cutoff events as its base data, the
   run's scorer as the first current model, a scratch registry outside the run): fine-tune, judge on the
   newest held-back events, swap in only when not worse. The rounds (events seen, seconds, accepted, why) and
   the freshness they give (an event reaches the serving model after at most N events plus one round) are
   reported. (a) frozen state and model, (b) online = live state, (c) learning = live state + learning loop.
   Paired 95% bootstrap intervals (targets resampled) of NDCG@k differences: online - frozen and learning -
   online.
Writes `replay.json` (metrics, counts, timings) to `out_dir` (default RUN/eval).
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from llmrec import schema

logger = logging.getLogger(__name__)

__all__ = ["replay", "cutoff_split"]



def cutoff_split(
    interactions: pd.DataFrame, test_frac: float = 0.1
) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    """(history ts <= cutoff, stream ts > cutoff in time order, cutoff). Raises ValueError when empty."""
    if not 0.0 < test_frac < 1.0:
        raise ValueError(f"test_frac must be within (0, 1), got {test_frac}")
    if len(interactions) == 0:
        raise ValueError("no interactions to replay")
    df = interactions.sort_values([schema.TS, schema.USER_ID, schema.ITEM_ID, schema.EVENT], kind="mergesort")
    cutoff = int(np.quantile(df[schema.TS].to_numpy(), 1.0 - test_frac, method="lower"))
    hist = df[df[schema.TS] <= cutoff].reset_index(drop=True)
    stream = df[df[schema.TS] > cutoff].reset_index(drop=True)
    if len(stream) == 0:
        raise ValueError(f"no events after the cutoff ts {cutoff} (all timestamps equal?); nothing to replay")
    return hist, stream, cutoff


def replay(
    run_dir: str | Path,
    data_dir: str | Path,
    *,
    url: str | None = None,
    max_events: int | None = 2000,
    k: int = 10,
    test_frac: float = 0.1,
    out_dir: str | Path | None = None,
    auth_token: str | None = None,
    rank_config: Mapping[str, Any] | None = None,
    learn_every: int | None = None,
    learn_config: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the replay (see the module docstring) and write `replay.json`; returns what was written.

    Args:
        run_dir: run folder with embeddings/ and index/ (and optionally scorer/).
        data_dir: folder (or file) with the canonical interactions.parquet to replay.
        url: base URL of a running `llmrec serve` (e.g. http://127.0.0.1:8000); None = in-process.
        max_events: stream at most this many post-cutoff events (None = all).
        k: list length per request.
        test_frac: fraction of events (by time) after the cutoff.
        out_dir: where replay.json goes (default RUN/eval).
        auth_token: bearer token of the server (url mode, when auth is on).
        rank_config: RankConfig overrides (in-process mode).
        learn_every: run a learning-loop round every this many streamed events (in-process mode; step 5).
        learn_config: keyword arguments of `llmrec.learn.learn` for those rounds (epochs, max_steps, ...).
    """
    from llmrec.data.tables import read_interactions

    t0 = time.perf_counter()
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if max_events is not None and max_events < 1:
        raise ValueError(f"max_events must be >= 1 (or None for all), got {max_events}")
    if learn_every is not None and (learn_every < 1 or url):
        raise ValueError(
            f"learn_every must be >= 1 and needs the in-process replay (no --url), got {learn_every}"
            + (f" with url {url}" if url else "")
        )
    inter = read_interactions(data_dir)
    hist, stream, cutoff = cutoff_split(inter, test_frac)
    hist_all = hist
    n_stream_total = len(stream)
    if max_events is not None:
        stream = stream.iloc[:max_events]
    users = set(stream[schema.USER_ID])
    hist = hist[hist[schema.USER_ID].isin(users)]
    logger.info(
        "replay: cutoff ts %d, %d history events of %d users, streaming %d of %d later events",
        cutoff,
        len(hist),
        len(users),
        len(stream),
        n_stream_total,
    )
    runner = (
        _HttpRunner(url, auth_token, k, run_dir) if url else _LocalRunner(run_dir, k, rank_config, cutoff)
    )
    try:
        if learn_every is not None:
            runner.enable_learning(hist_all, data_dir, learn_every, dict(learn_config or {}))
        runner.init_users(hist)
        t_stream = time.perf_counter()
        res = _stream(runner, stream, k)
        stream_s = time.perf_counter() - t_stream
    finally:
        runner.close()
    out = {
        "mode": "http" if url else "in-process",
        "url": url,
        "run_dir": str(run_dir),
        "data": str(data_dir),
        "k": k,
        "test_frac": test_frac,
        "cutoff_ts": cutoff,
        "n_history_events": int(len(hist)),
        "n_stream_events": int(len(stream)),
        "n_stream_events_available": int(n_stream_total),
        "n_users": len(users),
        **res,
        "stream_s": round(stream_s, 3),
        "events_per_s": round(len(stream) / stream_s, 1) if stream_s > 0 else None,
        "wall_s": round(time.perf_counter() - t0, 3),
        "scorer": getattr(runner, "has_scorer", None),
        "scorer_choice": getattr(runner, "scorer_why", None),
    }
    if learn_every is not None:
        out["learn_every"] = learn_every
        out["learn_rounds"] = runner.learn_rounds
        secs = [r["seconds"] for r in runner.learn_rounds]
        out["model_freshness"] = {
            "events_until_a_round": learn_every,
            "round_s_p50": float(np.median(secs)) if secs else None,
            "round_s_max": float(np.max(secs)) if secs else None,
            "rounds_accepted": sum(bool(r["accepted"]) for r in runner.learn_rounds),
        }
    out_path = Path(out_dir) if out_dir else Path(run_dir) / schema.RUN_EVAL
    out_path.mkdir(parents=True, exist_ok=True)
    (out_path / "replay.json").write_text(json.dumps(out, indent=2) + "\n")
    on, fr = out["online"], out["frozen"]
    logger.info(
        "replay: %d targets; Recall@%d online %.4f vs frozen %.4f, NDCG@%d online %.4f vs frozen %.4f "
        "(%.1fs) -> %s",
        out["n_targets"],
        k,
        on[f"recall@{k}"],
        fr[f"recall@{k}"],
        k,
        on[f"ndcg@{k}"],
        fr[f"ndcg@{k}"],
        out["wall_s"],
        out_path / "replay.json",
    )
    return out


def _stream(runner: Any, stream: pd.DataFrame, k: int) -> dict[str, Any]:
    from llmrec.metrics import bootstrap_ci, recall_ndcg

    seen: dict[str, set[str]] = runner.seen
    modes = tuple(getattr(runner, "modes", ("online", "frozen")))
    acc = {m: {"all": [0.0, 0.0, 0], "pos": [0.0, 0.0, 0]} for m in modes}
    gains: dict[str, list[float]] = {m: [] for m in modes}
    lat: list[float] = []
    for row in stream.itertuples(index=False):
        uid, item = getattr(row, schema.USER_ID), getattr(row, schema.ITEM_ID)
        ev, rating = getattr(row, schema.EVENT), getattr(row, schema.RATING)
        value = (
            None if rating is None or (isinstance(rating, float) and math.isnan(rating)) else float(rating)
        )
        user_seen = seen.setdefault(uid, set())
        if runner.knows(item) and item not in user_seen:
            positive = schema.is_positive(ev, value)
            for mode in modes:
                t = time.perf_counter()
                recs = runner.recommend(uid, mode)
                if mode == "online":
                    lat.append(time.perf_counter() - t)
                hit, gain = recall_ndcg(np.asarray(recs, dtype=object), np.asarray([item], dtype=object), k)
                gains[mode].append(gain)
                for part in ("all", "pos") if positive else ("all",):
                    a = acc[mode][part]
                    a[0] += hit
                    a[1] += gain
                    a[2] += 1
        ts = float(getattr(row, schema.TS))
        runner.apply(uid, item, ev, value, ts)
        user_seen.add(item)
        if hasattr(runner, "after_event"):
            runner.after_event(uid, item, ev, value, ts)
    res: dict[str, Any] = {}
    for mode in modes:
        a, p = acc[mode]["all"], acc[mode]["pos"]
        res[mode] = {
            f"recall@{k}": a[0] / a[2] if a[2] else 0.0,
            f"ndcg@{k}": a[1] / a[2] if a[2] else 0.0,
            f"recall@{k}_positive": p[0] / p[2] if p[2] else 0.0,
            f"ndcg@{k}_positive": p[1] / p[2] if p[2] else 0.0,
        }
    res["n_targets"] = acc["online"]["all"][2]
    res["n_positive_targets"] = acc["online"]["pos"][2]
    res["gain"] = {m: res["online"][m] - res["frozen"][m] for m in res["online"]}
    pairs = [("online", "frozen")] + ([("learning", "online")] if "learning" in modes else [])
    res["diff_ci95"] = {
        f"{a}-{b} ndcg@{k}": list(bootstrap_ci(np.asarray(gains[a]), np.asarray(gains[b])))
        for a, b in pairs
        if gains[a]
    }
    if "learning" in modes:
        res["gain_learning"] = {m: res["learning"][m] - res["online"][m] for m in res["online"]}
    # each list's NDCG@k in stream order (targets are the same in every mode): paired comparisons across runs
    res[f"ndcg@{k}_per_target"] = {m: [round(float(g), 6) for g in gains[m]] for m in modes}
    if lat:
        res["online_recommend_ms"] = {
            "p50": float(np.percentile(lat, 50) * 1e3),
            "p99": float(np.percentile(lat, 99) * 1e3),
        }
    return res


class _LocalRunner:
    """In-process: RecommendCore + apply_event + MeanVectorizer (the code the state shards run)."""

    def __init__(
        self, run_dir: str | Path, k: int, rank_config: Mapping[str, Any] | None, cutoff: int | None = None
    ) -> None:
        from llmrec.artifacts import read_meta
        from llmrec.index.item_index import ItemIndex
        from llmrec.serve.recommend_core import (
            RankConfig,
            RecommendCore,
            default_scorer_is_better,
            load_catalog,
        )
        from llmrec.state.user_state import MeanVectorizer

        run = Path(run_dir)
        catalog, embed_meta = load_catalog(run)
        index = ItemIndex.load(run / schema.RUN_INDEX, expect_embed_meta=embed_meta, device="cpu")
        scorer = None
        use, why = default_scorer_is_better(run)  # the same choice the served app makes
        if use and cutoff is not None:
            seen_until = read_meta(run / schema.RUN_SCORER).get("data_ts_max")
            if seen_until is not None and int(seen_until) > cutoff:
                # it learned from the very events replay streams (co-occurrences included): not held out
                use, why = False, (
                    f"RUN/scorer was trained on events up to ts {int(seen_until)}, after the replay cutoff "
                    f"{cutoff}, so it has seen the replayed events; replaying with the text user vector "
                    "instead "
                    "(to replay a scorer, train it on the pre-cutoff events only)"
                )
        logger.info("RUN/scorer %s: %s", "used" if use else "not used", why)
        if use:
            from llmrec.scorer.inference import Scorer

            scorer = Scorer.load(run / schema.RUN_SCORER, device="cpu")
        self.has_scorer = scorer is not None
        self.scorer_why = why
        self.run = run
        self.vectorizer = MeanVectorizer(catalog.item_ids, catalog.vectors)
        self.rank_config = RankConfig(**(rank_config or {}))
        self.core = RecommendCore(catalog, index, scorer=scorer, config=self.rank_config)
        self.modes: tuple[str, ...] = ("online", "frozen")
        self.learn_core: Any = None
        self.learn_rounds: list[dict[str, Any]] = []
        self.k = k
        self.online: dict[str, Any] = {}
        self.frozen_recs: dict[str, list[str]] = {}
        self.frozen: dict[str, Any] = {}
        self.seen: dict[str, set[str]] = {}

    def knows(self, item: str) -> bool:
        return item in self.core.catalog.id_to_idx

    def enable_learning(
        self, base: pd.DataFrame, data_dir: str | Path, every: int, learn_kwargs: dict[str, Any]
    ) -> None:
        """Step 5 of the module docstring: a scratch run (links to RUN/embeddings, index, scorer; its own
        model registry) whose learning rounds serve the "learning" list."""
        import tempfile

        if not self.has_scorer:
            raise ValueError(
                "replay with a learning loop needs RUN/scorer trained on the pre-cutoff events only; "
                f"{self.scorer_why}"
            )
        self._scratch = tempfile.TemporaryDirectory(prefix="llmrec-replay-learn-")
        scratch = Path(self._scratch.name)
        for part in (schema.RUN_EMBEDDINGS, schema.RUN_INDEX, schema.RUN_SCORER):
            (scratch / part).symlink_to((self.run / part).resolve(), target_is_directory=True)
        self._learn = {"base": base, "data_dir": str(data_dir), "every": int(every), "kwargs": learn_kwargs,
                       "scratch": scratch, "events": [], "since": 0}
        self.learn_core = self.core  # the run's scorer until a round swaps another in
        self.modes = ("online", "frozen", "learning")

    def after_event(self, uid: str, item: str, ev: str, value: float | None, ts: float) -> None:
        if self.learn_core is None:
            return
        lc = self._learn
        lc["events"].append((uid, item, int(ts), np.nan if value is None else float(value), ev))
        lc["since"] += 1
        if lc["since"] < lc["every"]:
            return
        lc["since"] = 0
        from llmrec.learn import learn
        from llmrec.scorer.inference import Scorer
        from llmrec.serve.recommend_core import RecommendCore

        new = pd.DataFrame(lc["events"], columns=[schema.USER_ID, schema.ITEM_ID, schema.TS, schema.RATING,
                                                  schema.EVENT])
        t0 = time.perf_counter()
        res = learn(lc["scratch"], new, data_dir=lc["data_dir"], base=lc["base"], **lc["kwargs"])
        if res.accepted:
            scorer = Scorer.load(res.candidate_dir, device="cpu")
            self.learn_core = RecommendCore(self.core.catalog, self.core.index, scorer=scorer,
                                            config=self.rank_config)
        secs = time.perf_counter() - t0
        self.learn_rounds.append({"after_events": len(lc["events"]), "seconds": round(secs, 1),
                                  "accepted": res.accepted, "why": res.why,
                                  "n_heldout_targets": res.n_heldout_targets})
        logger.info("replay learning round after %d events: %s (%s, %.0fs)", len(lc["events"]),
                    "swapped in" if res.accepted else "kept the model", res.why, secs)

    def _state(self, uid: str) -> Any:
        from llmrec.state.user_state import UserState

        if uid not in self.online:
            self.online[uid] = UserState(user_id=uid)
        return self.online[uid]

    def init_users(self, hist: pd.DataFrame) -> None:
        t0 = time.perf_counter()
        for row in hist.sort_values([schema.USER_ID, schema.TS], kind="mergesort").itertuples(index=False):
            uid = getattr(row, schema.USER_ID)
            r = getattr(row, schema.RATING)
            value = None if r is None or (isinstance(r, float) and math.isnan(r)) else float(r)
            self.apply(
                uid,
                getattr(row, schema.ITEM_ID),
                getattr(row, schema.EVENT),
                value,
                float(getattr(row, schema.TS)),
            )
            self.seen.setdefault(uid, set()).add(getattr(row, schema.ITEM_ID))
        self.frozen = dict(self.online)
        logger.info(
            "initialised %d users from %d history events in %.1fs",
            len(self.online),
            len(hist),
            time.perf_counter() - t0,
        )

    def apply(self, uid: str, item: str, ev: str, value: float | None, ts: float) -> None:
        from llmrec.state.user_state import Event, apply_event

        self.online[uid] = apply_event(
            self._state(uid), Event(user_id=uid, item_id=item, event=ev, value=value, ts=ts)
        )

    def recommend(self, uid: str, mode: str) -> list[str]:
        from llmrec.serve.user_view import UserView

        if mode == "frozen" and uid in self.frozen_recs:
            return self.frozen_recs[uid]
        state = self.frozen.get(uid) if mode == "frozen" else self._state(uid)
        view = UserView.from_state(state, uid)
        if state is not None:
            vec = self.vectorizer(state)
            view.vector = vec
        core = self.learn_core if mode == "learning" else self.core
        recs = [r["item_id"] for r in core.recommend([view], k=self.k)[0]]
        if mode == "frozen":
            self.frozen_recs[uid] = recs
        return recs

    def close(self) -> None:
        scratch = getattr(self, "_scratch", None)
        if scratch is not None:
            scratch.cleanup()


class _HttpRunner:
    """Through a running server: online and frozen users are separate, namespaced user ids."""

    def __init__(self, url: str, auth_token: str | None, k: int, run_dir: str | Path) -> None:
        import requests

        self.url = url.rstrip("/")
        self.http = requests.Session()
        if auth_token:
            self.http.headers["Authorization"] = f"Bearer {auth_token}"
        self.k = k
        self.tag = uuid.uuid4().hex[:8]
        self.seen: dict[str, set[str]] = {}
        self.frozen_recs: dict[str, list[str]] = {}
        self.users: set[str] = set()
        self.has_scorer = None
        r = self.http.get(f"{self.url}/healthz", timeout=30)
        if r.status_code != 200:
            raise ValueError(
                f"{self.url}/healthz answered {r.status_code}: {r.text[:200]}; is `llmrec serve` up?"
            )
        from llmrec.embed.artifact import read_item_ids  # either layout

        self._known = {str(x) for x in read_item_ids(Path(run_dir) / schema.RUN_EMBEDDINGS)}

    def _uid(self, uid: str, mode: str) -> str:
        return f"replay-{self.tag}-{'on' if mode == 'online' else 'fr'}-{uid}"

    def _post(self, events: list[dict[str, Any]]) -> None:
        r = self.http.post(f"{self.url}/feedback", json={"events": events}, timeout=60)
        if r.status_code != 200:
            raise ValueError(f"POST /feedback answered {r.status_code}: {r.text[:300]}")

    def _event(self, uid: str, item: str, ev: str, value: float | None, ts: float) -> dict[str, Any]:
        d: dict[str, Any] = {
            "user_id": uid,
            "item_id": item,
            "event": ev,
            "ts": ts,
            "event_id": uuid.uuid4().hex,
        }
        if value is not None:
            d["value"] = value
        self.users.add(uid)
        return d

    def init_users(self, hist: pd.DataFrame) -> None:
        batch: list[dict[str, Any]] = []
        for row in hist.itertuples(index=False):
            uid, item = getattr(row, schema.USER_ID), getattr(row, schema.ITEM_ID)
            self.seen.setdefault(uid, set()).add(item)
            if not self.knows(item):
                continue
            r = getattr(row, schema.RATING)
            value = None if r is None or (isinstance(r, float) and math.isnan(r)) else float(r)
            for mode in ("online", "frozen"):
                batch.append(
                    self._event(
                        self._uid(uid, mode),
                        item,
                        getattr(row, schema.EVENT),
                        value,
                        float(getattr(row, schema.TS)),
                    )
                )
            if len(batch) >= 500:
                self._post(batch)
                batch = []
        if batch:
            self._post(batch)

    def knows(self, item: str) -> bool:
        return item in self._known

    def apply(self, uid: str, item: str, ev: str, value: float | None, ts: float) -> None:
        if self.knows(item):
            self._post([self._event(self._uid(uid, "online"), item, ev, value, ts)])

    def recommend(self, uid: str, mode: str) -> list[str]:
        if mode == "frozen" and uid in self.frozen_recs:
            return self.frozen_recs[uid]
        r = self.http.get(
            f"{self.url}/recommend", params={"user_id": self._uid(uid, mode), "k": self.k}, timeout=30
        )
        if r.status_code != 200:
            raise ValueError(f"GET /recommend answered {r.status_code}: {r.text[:300]}")
        recs = [it["item_id"] for it in r.json()["items"]]
        if mode == "frozen":
            self.frozen_recs[uid] = recs
        return recs

    def close(self) -> None:
        for u in self.users:
            self.http.delete(f"{self.url}/users/{u}", timeout=30)
        self.http.close()
