"""Does the served model listen? Feedback responsiveness over the HTTP API of a served run (issue 11).

Starts the llmrec Serve app on a run folder (its default model: RUN/scorer when the run's evaluation measured
it better than the text user vector), then drives it as users would, over HTTP on 127.0.0.1:

- dislike in words: a new user likes `--likes` items of one facet (genre / category), asks for the top 20
  (share of that facet = before), says "please stop recommending <facet>" (a phrasing the scorer never saw in
  training), asks again (after). Target: the share falls by at least half.
- ask in words: a new user likes `--likes` items of one facet, then says "please recommend <other facet>":
  the share of the other facet in the top 20 before / after. Target: it rises.
- one like: a new user likes one item; facet overlap of the top 10 with it (share of the 10 that share a
  facet with the liked item), against the text user vector (the zero-shot MeanVectorizer path of the same
  RecommendCore, no scorer) on the same users. Target: llmrec >= 90% of the text vector's overlap.
- feedback -> visible latency: POST /feedback (the text) + GET /recommend that reflects it, client wall time.

Facets: those carried by >= 30 catalog items and by at most 25% of the catalog (a dislike of "Drama", 44% of
MovieLens, is a different request than one of a genre); users cycle through them. Liked items are drawn from a
facet's 100 most popular items (interactions in RUN/data), so the scorer knows them. Seeded.

    python benchmarks/feedback.py --run runs/movielens-latest-small --users 60 \\
        --out runs/bench/feedback-ml.json
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from llmrec.artifacts import write_json_report

logger = logging.getLogger("feedback_bench")

DISLIKE = "please stop recommending {f}"  # HELDOUT_TEMPLATES[-1][0] of llmrec.scorer.feedback
ASK = "please recommend {f}"  # HELDOUT_TEMPLATES[1][1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="run folder (data/, embeddings/, index/, scorer/, eval/)")
    p.add_argument("--users", type=int, default=60, help="simulated users per text scenario (default 60)")
    p.add_argument("--single", type=int, default=120, help="single-like users (default 120)")
    p.add_argument("--likes", type=int, default=4, help="items liked before the text (default 4)")
    p.add_argument("--k", type=int, default=20, help="list length the shares are read from (default 20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--user-config", default="{}", help="JSON user_config for the app (e.g. scorer_dir)")
    p.add_argument("--out", default=None, help="JSON report path")
    args = p.parse_args(argv)

    from llmrec.log import setup_logging
    from llmrec.raysetup import init_ray, local_env_defaults, ray_detail_to_log_files

    local_env_defaults()
    ray_detail_to_log_files()  # Ray Data's progress dumps to the session's log files
    setup_logging("INFO")
    run = Path(args.run).resolve()
    facets, ids, pop = _catalog(run)
    rng = np.random.default_rng(args.seed)
    eligible = _eligible_facets(facets, len(ids))
    if len(eligible) < 2:
        raise SystemExit(
            f"{run}: fewer than 2 facets with >= 30 items and <= 25% of the catalog; nothing to test"
        )
    init_ray()
    from ray import serve
    from ray.serve.schema import LoggingConfig

    from llmrec.serve.app import build_app

    port = _free_port()
    serve.start(
        http_options={"host": "127.0.0.1", "port": port},
        logging_config=LoggingConfig(enable_access_log=False),
    )
    events = tempfile.mkdtemp(prefix="llmrec-fb-bench-events-")
    app_args = {"run_dir": str(run), "n_shards": 2, "state_name": f"fb-bench-{uuid.uuid4().hex[:6]}",
                "log_dir": events, "user_config": json.loads(args.user_config)}
    t0 = time.perf_counter()
    serve.run(build_app(app_args), name="fbbench", route_prefix="/fbbench",
              logging_config=LoggingConfig(enable_access_log=False))
    url = f"http://127.0.0.1:{port}/fbbench"
    import requests

    http = requests.Session()
    health = http.get(f"{url}/healthz", timeout=60).json()
    admin = http.get(f"{url}/admin/stats", timeout=60).json()
    logger.info("app up in %.1fs: %s", time.perf_counter() - t0, health)
    report: dict[str, Any] = {"run": str(run), "args": vars(args), "model": admin.get("model"),
                              "facets_eligible": len(eligible)}
    try:
        report["dislike"] = _text_scenario(http, url, ids, facets, pop, eligible, args, rng, negative=True)
        report["ask"] = _text_scenario(http, url, ids, facets, pop, eligible, args, rng, negative=False)
        report["single_like"] = _single_like(http, url, run, ids, facets, pop, args, rng)
    finally:
        serve.delete("fbbench")
        _kill_state(app_args["state_name"])
    _print(report)
    write_json_report(report, args.out)
    return 0


def _catalog(run: Path) -> tuple[list[set[str]], list[str], np.ndarray]:
    """Per catalog item (embeddings order): its facets, id, and interaction count in RUN/data."""
    import pandas as pd

    from llmrec.data.facets import item_facets
    from llmrec.data.tables import read_items
    from llmrec.embed.artifact import load_embeddings

    emb = load_embeddings(run / "embeddings")
    items = read_items(run / "data")
    by_id = dict(zip(items["item_id"].astype(str), item_facets(items), strict=True))
    ids = [str(i) for i in emb.item_ids]
    counts = pd.read_parquet(
        run / "data" / "interactions.parquet", columns=["item_id"]
    )["item_id"].astype(str)
    vc = counts.value_counts()
    return [set(by_id.get(i, [])) for i in ids], ids, np.array([vc.get(i, 0) for i in ids], np.float64)


def _eligible_facets(facets: list[set[str]], n: int) -> list[str]:
    counts: dict[str, int] = {}
    for fs in facets:
        for f in fs:
            counts[f] = counts.get(f, 0) + 1
    return sorted(f for f, c in counts.items() if 30 <= c <= 0.25 * n)


def _members(facets: list[set[str]], pop: np.ndarray, f: str, top: int = 100) -> np.ndarray:
    idx = np.array([i for i, fs in enumerate(facets) if f in fs and pop[i] > 0], np.int64)
    return idx[np.argsort(-pop[idx], kind="stable")][:top]


def _share(items: list[dict[str, Any]], id_pos: dict[str, int], facets: list[set[str]], f: str) -> float:
    return float(np.mean([f in facets[id_pos[it["item_id"]]] for it in items])) if items else 0.0


def _post(http: Any, url: str, events: list[dict[str, Any]]) -> dict[str, Any]:
    r = http.post(f"{url}/feedback", json={"events": events}, timeout=60)
    if r.status_code != 200:
        raise RuntimeError(f"POST /feedback -> {r.status_code}: {r.text[:300]}")
    return r.json()


def _recommend(http: Any, url: str, user: str, k: int) -> list[dict[str, Any]]:
    r = http.get(f"{url}/recommend", params={"user_id": user, "k": k}, timeout=60)
    if r.status_code != 200:
        raise RuntimeError(f"GET /recommend -> {r.status_code}: {r.text[:300]}")
    return r.json()["items"]


def _text_scenario(http, url, ids, facets, pop, eligible, args, rng, negative: bool) -> dict[str, Any]:
    """Like --likes items of facet f, then a text: against f (negative) or for another facet g (positive)."""
    id_pos = {i: j for j, i in enumerate(ids)}
    rows, lat = [], []
    order = rng.permutation(len(eligible))
    for u in range(args.users):
        f = eligible[order[u % len(order)]]
        members = _members(facets, pop, f)
        if len(members) < args.likes:
            continue
        g = f if negative else eligible[order[(u + 1 + len(order) // 2) % len(order)]]
        user = f"bench-{'neg' if negative else 'pos'}-{uuid.uuid4().hex[:8]}"
        liked = rng.choice(members, size=args.likes, replace=False)
        t = time.time() - 3600
        _post(http, url, [{"user_id": user, "item_id": ids[i], "event": "like", "ts": t + j}
                          for j, i in enumerate(liked)])
        before = _recommend(http, url, user, args.k)
        text = (DISLIKE if negative else ASK).format(f=g)
        t1 = time.perf_counter()
        _post(http, url, [{"user_id": user, "event": "dislike" if negative else "like", "text": text}])
        after = _recommend(http, url, user, args.k)
        lat.append((time.perf_counter() - t1) * 1e3)
        rows.append({"facet": g, "liked_facet": f, "before": _share(before, id_pos, facets, g),
                     "after": _share(after, id_pos, facets, g),
                     "reasons_after": [it["reason"] for it in after[:3]]})
    before = float(np.mean([r["before"] for r in rows]))
    after = float(np.mean([r["after"] for r in rows]))
    out = {"n_users": len(rows), "share_before": before, "share_after": after,
           "users_halved" if negative else "users_raised": float(np.mean(
               [r["after"] <= 0.5 * r["before"] if negative else r["after"] > r["before"]
                for r in rows if (r["before"] > 0 or not negative)])),
           "latency_ms_p50": statistics.median(lat), "latency_ms_p95": float(np.percentile(lat, 95)),
           "examples": rows[:5]}
    return out


def _single_like(http, url, run: Path, ids, facets, pop, args, rng) -> dict[str, Any]:
    """One like per user: facet overlap of the top 10, served model vs the text user vector."""
    from llmrec.index.item_index import ItemIndex
    from llmrec.serve.recommend_core import RecommendCore, load_catalog
    from llmrec.serve.user_view import UserView
    from llmrec.state.user_state import Event, MeanVectorizer, UserState, apply_event, summary

    cat, _ = load_catalog(run)
    text_core = RecommendCore(cat, ItemIndex.load(run / "index"), scorer=None)
    vec = MeanVectorizer(cat.item_ids, cat.vectors)
    cand = np.array([i for i, fs in enumerate(facets) if fs and pop[i] > 0], np.int64)
    picks = rng.choice(cand, size=min(args.single, len(cand)), replace=False)
    id_pos = {i: j for j, i in enumerate(ids)}
    served, text, reasons = [], [], {}
    for i in picks:
        user = f"bench-one-{uuid.uuid4().hex[:8]}"
        _post(http, url, [{"user_id": user, "item_id": ids[i], "event": "like", "ts": 1.0}])
        top = _recommend(http, url, user, 10)
        st = apply_event(UserState(user), Event(user_id=user, item_id=ids[i], event="like", ts=1.0))
        view = UserView.from_state(summary(st, vector=vec(st)), user)
        ref = text_core.recommend([view], k=10)[0]
        overlap = lambda items, i=i: float(  # noqa: E731
            np.mean([bool(facets[i] & facets[id_pos[it["item_id"]]]) for it in items])
        )
        served.append(overlap(top))
        text.append(overlap(ref))
        for it in top:
            key = it["reason"].split("'")[0].strip()
            reasons[key] = reasons.get(key, 0) + 1
    s, t = float(np.mean(served)), float(np.mean(text))
    return {"n_users": len(picks), "overlap_served": s, "overlap_text_vector": t,
            "ratio": s / t if t > 0 else None,
            "reasons_top10": dict(sorted(reasons.items(), key=lambda kv: -kv[1]))}


def _kill_state(name: str) -> None:
    import ray

    for i in range(2):
        try:
            ray.kill(ray.get_actor(f"{name}-{i}", namespace="llmrec"), no_restart=True)
        except ValueError:
            pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _print(r: dict[str, Any]) -> None:
    d, a, s = r["dislike"], r["ask"], r["single_like"]
    print(f"model: {json.dumps(r.get('model'))}")
    print(f"dislike in words ({d['n_users']} users): facet share of top {r['args']['k']} "
          f"{d['share_before']:.3f} -> {d['share_after']:.3f} "
          f"({d['users_halved']:.0%} of users at least halved); "
          f"feedback->visible p50 {d['latency_ms_p50']:.0f} ms, p95 {d['latency_ms_p95']:.0f} ms")
    print(f"ask in words ({a['n_users']} users): "
          f"facet share {a['share_before']:.3f} -> {a['share_after']:.3f} "
          f"({a['users_raised']:.0%} of users raised)")
    print(f"one like ({s['n_users']} users): "
          f"top-10 facet overlap served {s['overlap_served']:.3f} vs text vector "
          f"{s['overlap_text_vector']:.3f} (ratio {s['ratio']:.2f})")


if __name__ == "__main__":
    raise SystemExit(main())
