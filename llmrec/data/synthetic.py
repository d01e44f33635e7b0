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
Both return canonical-schema frames (see docs/design.md). Tests: tests/test_synthetic.py.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from llmrec.schema import EVENT, ITEM_ID, RATING, TEXT, TS, USER_ID

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
    rng = np.random.default_rng(seed)
    names = list(TOPICS)[:n_topics]
    width = max(5, len(str(n_items - 1)))
    topics = np.arange(n_items, dtype=np.int64) % n_topics
    # all random draws up front (one vectorised call each): 3 sentence slots per item, 3 content words each
    n_sent = rng.integers(2, 4, n_items)
    tpl = rng.integers(len(_TEMPLATES), size=(n_items, 3))
    from_topic = rng.random((n_items, 3, 3)) < 0.67  # about 2/3 of content words come from the topic
    word_u = rng.random((n_items, 3, 3))
    adj = rng.integers(len(ADJECTIVES), size=(n_items, 3))
    fill = rng.integers(len(FILLER), size=(n_items, 3, 3))  # f, f2, and a title word
    head_u = rng.random(n_items)
    # plain lists: indexing them in the loop below is ~10x faster than numpy scalar indexing
    n_sent, tpl, from_topic, word_u = n_sent.tolist(), tpl.tolist(), from_topic.tolist(), word_u.tolist()
    adj, fill, head_u, topic_l = adj.tolist(), fill.tolist(), head_u.tolist(), topics.tolist()
    ids, texts, titles = [], [], []
    for i in range(n_items):
        vocab = TOPICS[names[topic_l[i]]]
        sentences = []
        for k in range(n_sent[i]):
            w = [
                vocab[int(word_u[i][k][m] * len(vocab))]
                if from_topic[i][k][m]
                else FILLER[int(word_u[i][k][m] * len(FILLER))]
                for m in range(3)
            ]
            sentences.append(
                _TEMPLATES[tpl[i][k]].format(
                    adj=ADJECTIVES[adj[i][k]],
                    f=FILLER[fill[i][k][0]],
                    f2=FILLER[fill[i][k][1]],
                    w1=w[0],
                    w2=w[1],
                    w3=w[2],
                )
            )
        title = f"{vocab[int(head_u[i] * len(vocab))].capitalize()} {FILLER[fill[i][0][2]]} {i}"
        ids.append(f"i{i:0{width}d}")
        titles.append(title)
        texts.append(f"{title}. " + " ".join(sentences))
    df = pd.DataFrame(
        {
            ITEM_ID: ids,
            TEXT: texts,
            "title": titles,
            "topic": topics,
            "topic_name": [names[t] for t in topics],
        }
    )
    logger.debug("synthetic catalog: %d items, %d topics", n_items, n_topics)
    return df


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
