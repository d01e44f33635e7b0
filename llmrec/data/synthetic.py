"""Seeded synthetic catalogs and interactions with planted structure (for tests, benchmarks and smoke runs).

- `make_catalog(n_items, n_topics)`: item i belongs to topic `i % n_topics`; its text is 2-3 English
  sentences built from templates that mix that topic's vocabulary (about 2/3 of the content words) with
  shared filler words every topic uses, so a text encoder can separate topics but not trivially.
- `make_interactions(items, n_users)`: each user prefers 1 or 2 topics; each event picks one of them
  (10 % of events are noise from any topic). Within a topic, items sit on a line (their rank inside the
  topic) and a user drifts along it: the next item is near the previous one (a small random step), or, with
  probability 0.3, a popular item (Zipf popularity skew). A user never repeats an item. `ts` is increasing
  per user (unix seconds, 2024), events are view/click/like/purchase/rating with ratings only on "rating".
  The planted truth is in `df.attrs["user_topics"]` ({user_id: [topic, ...]}).
Both return canonical-schema frames (see docs/design.md).
- `write_sharded(out, n_items, n_users, n_events, n_shards)`: the same kind of data at any size (1M items,
  10M events, ...), written as parquet shards one shard at a time (items/, interactions/, truth/ and
  synthetic.json): a `llmrec prepare --dataset generic` input, and `llmrec embed --items out/items` reads the
  catalog shards directly. Command line: `python -m llmrec.data.synthetic --items 1000000 --users 1000000
  --events 10000000 --out DIR --shards 64`.
Tests: tests/test_synthetic.py.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from llmrec.schema import EVENT, FACETS, ITEM_ID, RATING, TEXT, TS, USER_ID

logger = logging.getLogger(__name__)

# fmt: off
TOPICS: dict[str, list[str]] = {
    "cooking": ["recipe", "oven", "garlic", "pasta", "bake", "sauce", "spices", "kitchen", "chef", "dough",
                "roast", "flavour", "simmer", "butter", "dessert", "soup"],
    "astronomy": ["telescope", "galaxy", "planet", "orbit", "nebula", "comet", "stars", "asteroid", "moon",
                  "cosmos", "eclipse", "rocket", "satellite", "astronaut", "supernova", "constellation"],
    "football": ["goal", "striker", "league", "referee", "stadium", "penalty", "midfielder", "coach",
                 "match", "tackle", "keeper", "season", "transfer", "derby", "championship", "fans"],
    "music": ["guitar", "melody", "album", "concert", "drummer", "chorus", "symphony", "band", "lyrics",
              "piano", "rhythm", "singer", "orchestra", "jazz", "vinyl", "tour"],
    "gardening": ["tomatoes", "compost", "seedlings", "soil", "roses", "pruning", "greenhouse", "shrubs",
                  "weeds", "mulch", "bulbs", "hedge", "orchard", "watering", "blossom", "lawn"],
    "finance": ["stocks", "dividend", "portfolio", "inflation", "bonds", "interest", "savings", "market",
                "investor", "budget", "mortgage", "pension", "tax", "equity", "currency", "bank"],
    "programming": ["python", "compiler", "debugging", "algorithm", "database", "software", "function",
                    "variable", "server", "framework", "library", "code", "testing", "deployment", "api",
                    "refactoring"],
    "medicine": ["patients", "surgery", "vaccine", "diagnosis", "hospital", "nurse", "therapy", "symptoms",
                 "doctor", "clinic", "infection", "prescription", "cardiology", "antibiotics", "treatment",
                 "recovery"],
    "travel": ["passport", "airport", "hotel", "beaches", "itinerary", "luggage", "island", "tourists",
               "backpacking", "cruise", "museum", "souvenir", "flight", "guidebook", "hostel", "landmarks"],
    "history": ["empire", "medieval", "revolution", "castle", "archive", "dynasty", "ancient", "battle",
                "pharaoh", "manuscript", "kingdom", "colonial", "treaty", "monarch", "ruins", "knights"],
    "fitness": ["workout", "running", "muscles", "yoga", "marathon", "cardio", "stretching", "gym",
                "protein", "sprint", "weights", "endurance", "trainer", "cycling", "squats", "swimming"],
    "photography": ["camera", "lens", "shutter", "portrait", "exposure", "aperture", "tripod", "landscape",
                    "lighting", "darkroom", "zoom", "photographer", "flash", "focus", "film", "studio"],
    "cars": ["engine", "sedan", "gearbox", "tyres", "horsepower", "mileage", "brakes", "convertible",
             "dealership", "motorway", "fuel", "racing", "garage", "electric", "suspension", "driver"],
    "pets": ["puppy", "kitten", "veterinarian", "leash", "aquarium", "parrot", "grooming", "litter",
             "hamster", "breed", "fetch", "kennel", "paws", "whiskers", "treats", "obedience"],
    "art": ["painting", "canvas", "sculpture", "gallery", "watercolour", "brushstrokes", "easel", "mural",
            "sketch", "exhibition", "pigment", "curator", "abstract", "charcoal", "palette", "artist"],
    "weather": ["storm", "rainfall", "forecast", "thunder", "humidity", "drought", "blizzard", "breeze",
                "hurricane", "frost", "clouds", "temperature", "lightning", "monsoon", "fog", "heatwave"],
}
FILLER = ["guide", "story", "people", "weekend", "ideas", "tips", "world", "family", "year", "home", "time",
          "life", "notes", "collection", "history", "basics", "secrets", "friends", "questions", "mistakes"]
ADJECTIVES = ["new", "great", "simple", "classic", "modern", "complete", "practical", "little", "short",
              "friendly", "useful", "honest", "popular", "personal"]
_TEMPLATES = [
    "A {adj} guide to {w1}, {w2} and {w3}.",
    "This {adj} book covers {w1}, {w2} and the {f} of {w3}.",
    "Readers who like {w1} will enjoy these {adj} notes on {w2}.",
    "The {adj} {f} of {w1}, told through {w2}.",
    "From {w1} to {w2}: {adj} {f} for anyone into {w3}.",
    "Everything about {w1} and {w2}, with {adj} {f} for the {f2}.",
]
# fmt: on
_EVENTS = ("view", "click", "like", "purchase", "rating")
_EVENT_P = (0.45, 0.3, 0.1, 0.08, 0.07)
_T0 = 1_704_067_200  # 2024-01-01 UTC


def make_catalog(n_items: int, n_topics: int = 8, seed: int = 0) -> pd.DataFrame:
    """A seeded catalog of `n_items` items in `n_topics` topics.

    Returns:
        DataFrame (n_items rows): item_id "i00000"... (str), text (2-3 sentences), title, topic (int64,
        the planted label), topic_name (str).

    Raises:
        ValueError: n_items < 1 or n_topics outside [1, len(TOPICS)].

    Example::

        items = make_catalog(200, n_topics=4)
    """
    if n_items < 1:
        raise ValueError(f"n_items must be >= 1, got {n_items}")
    if not 1 <= n_topics <= len(TOPICS):
        raise ValueError(
            f"n_topics must be in [1, {len(TOPICS)}] (the built-in vocabularies), got {n_topics}"
        )
    df = _catalog_rows(0, n_items, n_items, n_topics, np.random.default_rng(seed))
    logger.debug("synthetic catalog: %d items, %d topics", n_items, n_topics)
    return df


def _catalog_rows(
    start: int, stop: int, n_items: int, n_topics: int, rng: np.random.Generator
) -> pd.DataFrame:
    """Rows [start, stop) of a catalog of `n_items` (make_catalog's columns; ids and topics are global)."""
    names = list(TOPICS)[:n_topics]
    width = max(5, len(str(n_items - 1)))
    n_rows = stop - start
    topics = np.arange(start, stop, dtype=np.int64) % n_topics
    # all random draws up front (one vectorised call each): 3 sentence slots per item, 3 content words each
    n_sent = rng.integers(2, 4, n_rows)
    tpl = rng.integers(len(_TEMPLATES), size=(n_rows, 3))
    from_topic = rng.random((n_rows, 3, 3)) < 0.67  # about 2/3 of content words come from the topic
    word_u = rng.random((n_rows, 3, 3))
    adj = rng.integers(len(ADJECTIVES), size=(n_rows, 3))
    fill = rng.integers(len(FILLER), size=(n_rows, 3, 3))  # f, f2, and a title word
    head_u = rng.random(n_rows)
    # plain lists: indexing them in the loop below is ~10x faster than numpy scalar indexing
    n_sent, tpl, from_topic, word_u = n_sent.tolist(), tpl.tolist(), from_topic.tolist(), word_u.tolist()
    adj, fill, head_u, topic_l = adj.tolist(), fill.tolist(), head_u.tolist(), topics.tolist()
    ids, texts, titles = [], [], []
    for r in range(n_rows):
        i = start + r
        vocab = TOPICS[names[topic_l[r]]]
        sentences = []
        for k in range(n_sent[r]):
            w = [
                vocab[int(word_u[r][k][m] * len(vocab))]
                if from_topic[r][k][m]
                else FILLER[int(word_u[r][k][m] * len(FILLER))]
                for m in range(3)
            ]
            sentences.append(
                _TEMPLATES[tpl[r][k]].format(
                    adj=ADJECTIVES[adj[r][k]],
                    f=FILLER[fill[r][k][0]],
                    f2=FILLER[fill[r][k][1]],
                    w1=w[0],
                    w2=w[1],
                    w3=w[2],
                )
            )
        title = f"{vocab[int(head_u[r] * len(vocab))].capitalize()} {FILLER[fill[r][0][2]]} {i}"
        ids.append(f"i{i:0{width}d}")
        titles.append(title)
        texts.append(f"{title}. " + " ".join(sentences))
    return pd.DataFrame(
        {
            ITEM_ID: ids,
            TEXT: texts,
            "title": titles,
            "topic": topics,
            "topic_name": [names[t] for t in topics],
        }
    )


def make_interactions(
    items: pd.DataFrame,
    n_users: int,
    events_per_user: int = 20,
    seed: int = 0,
) -> pd.DataFrame:
    """Seeded interactions with planted topic preferences, within-topic drift and popularity skew.

    Args:
        items: a catalog from `make_catalog` (needs `item_id` and `topic`).
        n_users: number of users ("u0000"...).
        events_per_user: events per user (fewer only if the user's topics run out of unseen items).

    Returns:
        DataFrame in the canonical interactions schema (user_id, item_id, ts int64, rating float64 with NaN,
        event), sorted by user then ts; `attrs["user_topics"]` = {user_id: [preferred topic, ...]}.

    Raises:
        ValueError: items without `item_id`/`topic` columns, n_users < 1 or events_per_user < 1.
    """
    missing = [c for c in (ITEM_ID, "topic") if c not in items.columns]
    if missing:
        raise ValueError(f"items lacks column(s) {missing}; pass a catalog from make_catalog()")
    if n_users < 1 or events_per_user < 1:
        raise ValueError(f"n_users and events_per_user must be >= 1, got {n_users}, {events_per_user}")
    rng = np.random.default_rng(seed)
    item_ids = items[ITEM_ID].astype(str).to_numpy()
    topic_of = items["topic"].to_numpy()
    topics = np.unique(topic_of)
    members = {int(t): np.flatnonzero(topic_of == t).tolist() for t in topics}  # catalog rows, "line" order
    # popularity: Zipf over a random permutation inside each topic, sampled through its CDF
    pop_cdf = {}
    for t, rows in members.items():
        w = 1.0 / np.arange(1, len(rows) + 1) ** 1.1
        pop_cdf[t] = np.cumsum(w[rng.permutation(len(rows))] / w.sum())

    width = max(4, len(str(n_users - 1)))
    E = events_per_user
    users, its, tss, evs, ratings = [], [], [], [], []
    user_topics: dict[str, list[int]] = {}
    for u in range(n_users):
        uid = f"u{u:0{width}d}"
        k = 1 if rng.random() < 0.5 or len(topics) == 1 else 2
        prefs = [int(t) for t in rng.choice(topics, size=k, replace=False)]
        user_topics[uid] = prefs
        pos = {t: int(rng.integers(len(members[t]))) for t in prefs}
        # this user's draws, one vectorised call each
        noise = rng.random(E) < 0.1
        noise_topic = rng.choice(topics, size=E)
        pref_pick = rng.integers(len(prefs), size=E)
        popular = rng.random(E) < 0.3
        pop_u = rng.random((E, 4))
        steps = rng.integers(-3, 4, size=E)
        gaps = rng.exponential(3600, size=E).astype(np.int64) + 1
        kinds = rng.choice(len(_EVENTS), size=E, p=_EVENT_P)
        stars = rng.normal(0.0, 0.7, size=E).tolist()
        noise, noise_topic, pref_pick, popular = (
            noise.tolist(),
            noise_topic.tolist(),
            pref_pick.tolist(),
            popular.tolist(),
        )
        steps, gaps, kinds = steps.tolist(), gaps.tolist(), kinds.tolist()
        seen: set[int] = set()  # catalog rows this user has had
        n_seen = {t: 0 for t in members}
        ts = _T0 + int(rng.integers(0, 30 * 86400))
        for e in range(E):
            t = int(noise_topic[e]) if noise[e] else prefs[pref_pick[e]]
            rows = members[t]
            if n_seen[t] == len(rows):
                continue
            j = -1
            if popular[e]:  # a popular item: a few draws from the Zipf CDF, first unseen one wins
                for x in pop_u[e]:
                    c = min(int(np.searchsorted(pop_cdf[t], x)), len(rows) - 1)
                    if int(rows[c]) not in seen:
                        j = c
                        break
            if j < 0:  # drift: a small step along the topic's line from the last item
                start = pos.get(t, int(pop_u[e, 0] * len(rows)))
                j = _nearest_unseen(rows, seen, (start + int(steps[e])) % len(rows))
            pos[t] = j
            r = int(rows[j])
            seen.add(r)
            n_seen[t] += 1
            ts += int(gaps[e])
            ev = _EVENTS[kinds[e]]
            users.append(uid)
            its.append(item_ids[r])
            tss.append(ts)
            evs.append(ev)
            mean = 4.2 if t in prefs else 2.5
            ratings.append(float(min(5, max(1, round(mean + stars[e])))) if ev == "rating" else np.nan)
    df = pd.DataFrame(
        {
            USER_ID: users,
            ITEM_ID: its,
            TS: np.asarray(tss, dtype=np.int64),
            RATING: np.asarray(ratings, dtype=np.float64),
            EVENT: evs,
        }
    )
    df.attrs["user_topics"] = user_topics
    logger.debug("synthetic interactions: %d users, %d events", n_users, len(df))
    return df


def _nearest_unseen(rows: np.ndarray, seen: set[int], j: int) -> int:
    """The position closest to j on the circular line of a topic's items whose item is not yet seen."""
    n = len(rows)
    for d in range(n):
        for c in ((j + d) % n, (j - d) % n):
            if int(rows[c]) not in seen:
                return c
    raise AssertionError("no unseen item; the caller checks the per-topic count")


# ----------------------------------------------------------------------------------- sharded, at scale

ZIPF_S = 1.1  # popularity exponent inside a topic (as make_interactions)


def write_sharded(
    out: str | os.PathLike,
    n_items: int,
    n_users: int,
    n_events: int,
    n_shards: int = 64,
    n_topics: int = 16,
    seed: int = 0,
) -> dict[str, Any]:
    """Write a seeded synthetic dataset of any size as parquet shards, one shard in memory at a time.

    Layout (a valid `llmrec prepare --dataset generic` input; `llmrec embed` also reads `items/` directly):

        out/items/part-SSSSS.parquet         item_id, text, title, topic, topic_name, facets ([topic_name])
        out/interactions/part-SSSSS.parquet  user_id, item_id, ts, rating, event (users contiguous, ts rising)
        out/truth/part-SSSSS.parquet         user_id, topics (list<int64>): the planted preferences
        out/synthetic.json                   parameters, counts written, and the commands that use it

    Planted structure, as `make_catalog` / `make_interactions` (vectorised per shard): item i has topic
    i % n_topics and a text built from that topic's vocabulary; a user follows 1 or 2 topics (90 % of events,
    the rest noise); within a topic the next item is 1-3 steps along the topic's line of items from the
    user's previous one there (a random anchor at first) or, with probability 0.3, a popular item (Zipf(1.1)
    rank, spread over the line by a fixed permutation), where the walk then continues; events per user are
    heavy-tailed (1 + a lognormal-weighted share, `n_events` in total); a user never repeats an item (a repeat
    moves to a neighbour on the line, up to 20 times, then is dropped and counted in `n_repeats_dropped`).
    Memory: one shard of items and events plus O(n_topics) tables.

    Args:
        out: output folder (created; part files of an earlier run there are replaced).
        n_items, n_users, n_events: sizes (n_events >= n_users: every user has an event).
        n_shards: files per table; items and users are split into contiguous, near-equal ranges.
        n_topics: planted topics, 1..16.
        seed: the whole output is a function of (seed, sizes, n_shards).

    Returns:
        The dict written to `out/synthetic.json`.

    Raises:
        ValueError: sizes out of range.

    Example::

        write_sharded("data/syn", n_items=100_000, n_users=50_000, n_events=1_000_000, n_shards=8)
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not 1 <= n_topics <= len(TOPICS):
        raise ValueError(
            f"n_topics must be in [1, {len(TOPICS)}] (the built-in vocabularies), got {n_topics}"
        )
    if n_items < n_topics or n_users < 1 or n_events < n_users:
        raise ValueError(
            f"need n_items >= n_topics, n_users >= 1 and n_events >= n_users, got n_items={n_items}, "
            f"n_topics={n_topics}, n_users={n_users}, n_events={n_events}"
        )
    if not 1 <= n_shards <= min(n_items, n_users):
        raise ValueError(f"n_shards must be in [1, min(n_items, n_users)], got {n_shards}")
    t0 = time.perf_counter()
    root = Path(out)
    dirs = {name: root / name for name in ("items", "interactions", "truth")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
        for old in d.glob("part-*.parquet"):
            old.unlink()
    names = list(TOPICS)[:n_topics]
    sizes = np.array(
        [(n_items - t + n_topics - 1) // n_topics for t in range(n_topics)], np.int64
    )  # items per topic
    spread = np.array(
        [_coprime_near(int(n), 0.618) for n in sizes], np.int64
    )  # popular rank -> line position
    width_i, width_u = max(5, len(str(n_items - 1))), max(4, len(str(n_users - 1)))
    written = dropped = 0
    for s in range(n_shards):
        lo, hi = _bounds(n_items, n_shards, s)
        items = _catalog_rows(lo, hi, n_items, n_topics, np.random.default_rng([seed, 0, s]))
        items[FACETS] = [[t] for t in items["topic_name"]]
        pq.write_table(
            pa.Table.from_pandas(items, preserve_index=False), dirs["items"] / f"part-{s:05d}.parquet"
        )

        u_lo, u_hi = _bounds(n_users, n_shards, s)
        e_lo, e_hi = (n_events * u_lo) // n_users, (n_events * u_hi) // n_users
        inter, truth, n_drop = _interactions_block(
            u_lo, u_hi, e_hi - e_lo, sizes, spread, width_i, width_u, np.random.default_rng([seed, 1, s])
        )
        pq.write_table(
            pa.Table.from_pandas(inter, preserve_index=False), dirs["interactions"] / f"part-{s:05d}.parquet"
        )
        pq.write_table(
            pa.Table.from_pandas(truth, preserve_index=False), dirs["truth"] / f"part-{s:05d}.parquet"
        )
        written += len(inter)
        dropped += n_drop
        if (s + 1) % max(1, n_shards // 8) == 0 or s + 1 == n_shards:
            logger.info(
                "synthetic: %d/%d shards, %d events so far (%.1fs)",
                s + 1,
                n_shards,
                written,
                time.perf_counter() - t0,
            )
    info = {
        "generator": "llmrec.data.synthetic.write_sharded",
        "seed": seed,
        "n_items": n_items,
        "n_users": n_users,
        "n_events": written,
        "n_events_requested": n_events,
        "n_repeats_dropped": dropped,
        "n_shards": n_shards,
        "n_topics": n_topics,
        "topics": names,
        "zipf_s": ZIPF_S,
        "wall_s": round(time.perf_counter() - t0, 2),
        "prepare": f"llmrec prepare --dataset generic --source {root} --items items "
        "--interactions interactions --out RUN/data",
        "embed": f"llmrec embed --items {root / 'items'} --out RUN/embeddings",
    }
    (root / "synthetic.json").write_text(json.dumps(info, indent=2) + "\n")
    logger.info(
        "synthetic: %d items, %d users, %d events in %d shards -> %s (%.1fs)",
        n_items,
        n_users,
        written,
        n_shards,
        root,
        info["wall_s"],
    )
    return info


def _bounds(n: int, parts: int, k: int) -> tuple[int, int]:
    """[lo, hi) of the k-th of `parts` contiguous, near-equal ranges of range(n)."""
    return (n * k) // parts, (n * (k + 1)) // parts


def _coprime_near(n: int, frac: float) -> int:
    """The first integer >= frac * n that is coprime with n (a multiplier that permutes range(n))."""
    m = max(1, int(frac * n))
    while math.gcd(m, n) != 1:
        m += 1
    return m


def _interactions_block(
    u_lo: int,
    u_hi: int,
    n_events: int,
    sizes: np.ndarray,
    spread: np.ndarray,
    width_i: int,
    width_u: int,
    rng: np.random.Generator,
) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    """Events of users [u_lo, u_hi) (write_sharded's docstring): (interactions, truth, repeats dropped)."""
    n_topics = len(sizes)
    U = u_hi - u_lo
    weights = rng.lognormal(0.0, 1.0, U)
    counts = 1 + rng.multinomial(n_events - U, weights / weights.sum())  # (U,) heavy-tailed, sum n_events
    user = np.repeat(np.arange(U), counts)  # (E,) users contiguous
    E = len(user)
    two = (rng.random(U) < 0.5) & (n_topics > 1)
    t1 = rng.integers(n_topics, size=U)
    t2 = (t1 + 1 + rng.integers(max(n_topics - 1, 1), size=U)) % n_topics  # != t1
    topic = np.where(two[user] & (rng.random(E) < 0.5), t2[user], t1[user])  # (E,)
    noise = rng.random(E) < 0.1
    topic[noise] = rng.integers(n_topics, size=int(noise.sum()))
    n_t = sizes[topic]  # (E,) items in the event's topic
    # popular: a Zipf(s) rank by the inverse of its continuous CDF on [1, n_t + 1), spread over the line
    a = 1.0 - ZIPF_S
    x = (1.0 - rng.random(E) * (1.0 - (n_t + 1.0) ** a)) ** (1.0 / a)
    rank = np.minimum(x.astype(np.int64) - 1, n_t - 1)
    pop_pos = (spread[topic] * rank) % n_t
    # drift: per (user, topic) a walk along the topic's line, small steps from the previous item, which is a
    # random anchor at first and the popular item itself after a popular pick (the walk restarts there)
    popular = rng.random(E) < 0.3
    key = user * n_topics + topic
    order = np.argsort(key, kind="stable")  # events of one (user, topic) together, in time order
    ks, pop_o = key[order], popular[order]
    steps = np.where(pop_o, 0, rng.integers(1, 4, size=E) * rng.choice([-1, 1], size=E))  # +-1..3
    first = np.r_[True, ks[1:] != ks[:-1]]
    reset = first | pop_o
    seg = np.cumsum(reset) - 1  # (E,) walk segment of each sorted event
    anchor = (rng.random(E) * n_t[order]).astype(np.int64)
    base = np.where(pop_o, pop_pos[order], anchor)[reset]  # (segments,) where each walk starts
    walk = np.cumsum(steps)
    pos = np.empty(E, np.int64)
    pos[order] = (base[seg] + walk - (walk - steps)[reset][seg]) % n_t[order]
    position = pos

    # no repeats per user: move a repeated item to a neighbour on the line (1, 2, ... steps away), up to 20
    # times, then drop it
    def repeated() -> np.ndarray:
        return pd.Series((user * n_topics + topic) * sizes.max() + position).duplicated().to_numpy()

    for r in range(20):
        dup = repeated()
        if not dup.any():
            break
        position[dup] = (position[dup] + (r + 1) * rng.choice([-1, 1], size=int(dup.sum()))) % n_t[dup]
    else:
        dup = repeated()
    keep = ~dup
    item = topic + n_topics * position  # (E,) catalog index: topic = index % n_topics
    gaps = rng.exponential(3600.0, E).astype(np.int64) + 1
    start = _T0 + rng.integers(0, 30 * 86400, size=U)
    cs = np.cumsum(gaps)
    seg0 = np.cumsum(counts) - counts  # first event of each user
    ts = start[user] + cs - (cs[seg0] - gaps[seg0])[user]  # (E,) rising per user
    kinds = rng.choice(len(_EVENTS), size=E, p=_EVENT_P)
    liked = (topic == t1[user]) | (two[user] & (topic == t2[user]))
    stars = np.clip(np.round(np.where(liked, 4.2, 2.5) + rng.normal(0.0, 0.7, E)), 1, 5)
    event = np.asarray(_EVENTS, dtype=object)[kinds]
    uid = np.char.add("u", np.char.zfill((u_lo + user[keep]).astype(str), width_u)).astype(object)
    inter = pd.DataFrame(
        {
            USER_ID: uid,
            ITEM_ID: np.char.add("i", np.char.zfill(item[keep].astype(str), width_i)).astype(object),
            TS: ts[keep].astype(np.int64),
            RATING: np.where(kinds == _EVENTS.index("rating"), stars, np.nan)[keep].astype(np.float64),
            EVENT: event[keep],
        }
    )
    prefs = [[int(t1[u]), int(t2[u])] if two[u] else [int(t1[u])] for u in range(U)]
    users = np.char.add("u", np.char.zfill(np.arange(u_lo, u_hi).astype(str), width_u)).astype(object)
    return inter, pd.DataFrame({USER_ID: users, "topics": prefs}), int(dup.sum())


def main(argv: list[str] | None = None) -> int:
    """`python -m llmrec.data.synthetic --items N --users N --events N --out DIR [--shards 64]`."""
    import argparse

    from llmrec.log import setup_logging

    p = argparse.ArgumentParser(
        prog="python -m llmrec.data.synthetic", description=write_sharded.__doc__.splitlines()[0]
    )
    p.add_argument("--items", type=int, required=True, help="catalog size")
    p.add_argument("--users", type=int, required=True, help="number of users")
    p.add_argument("--events", type=int, required=True, help="number of interactions (>= users)")
    p.add_argument(
        "--out", required=True, help="output folder (items/, interactions/, truth/, synthetic.json)"
    )
    p.add_argument("--shards", type=int, default=64, help="parquet files per table (default 64)")
    p.add_argument("--topics", type=int, default=16, help=f"planted topics, 1..{len(TOPICS)} (default 16)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = p.parse_args(argv)
    setup_logging("INFO")
    info = write_sharded(
        args.out,
        args.items,
        args.users,
        args.events,
        n_shards=args.shards,
        n_topics=args.topics,
        seed=args.seed,
    )
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
