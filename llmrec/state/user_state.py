"""Per-user state as a pure value: `Event`, `UserState`, `apply_event`, `summary` (-> `StateSummary`),
`MeanVectorizer` (no Ray).

An `Event` is one piece of feedback (`schema.EVENT_KINDS`) on an item, on a piece of free text ("less horror,
more space opera"), or on both. `apply_event(state, event)` returns a NEW `UserState`; the input is never
changed, so the store can log first and update memory after, and tests can compare before/after.

Polarity (the sign an event pushes the user vector with; the polarity column is `schema.polarity`):

=============  =========================================================  ========
event          weight of the item in the user vector                      polarity
=============  =========================================================  ========
purchase       +1.0                                                       positive
like           +1.0                                                       positive
click          +0.5                                                       positive
view           +0.25 (weak interest; never a negative, never text-only)   neutral
rating v>=4    +(v - 3) / 2   (4 -> 0.5, 5 -> 1.0)                        positive
2 < v < 4      0 (kept in history and `seen`, no pull either way)         neutral
rating v<=2    -(3 - v) / 2   (2 -> -0.5, 1 -> -1.0)                      negative
skip           -0.5                                                       negative
dislike        -1.0                                                       negative
=============  =========================================================  ========

Choices the design leaves open (documented here):

- Negative events add their |weight| to `negatives[item_id]` (capped at `max_negatives` items, oldest
  evicted); a later positive event on the same item removes it from `negatives`.
- `seen` holds every item the user touched (any kind), unbounded: serving excludes it from recommendations.
- A text-only event (no `item_id`) needs a polar kind (like/dislike/click/skip/purchase, or a rating <= 2 or
  >= 4): a neutral text has no direction, so it is refused rather than silently ignored.
- `text_vec` is optional (the ingress computes it with the item encoder); text without a vector is kept in
  `text_feedback` but cannot move the vector.
- `applied_ids` keeps the last `applied_len` (default 1000) event ids of the user; the store uses it to make
  retries idempotent. A retry older than that window would be applied again.
- The user vector (`MeanVectorizer`) uses recency by position (half-life in events, newest = weight 1), not
  wall-clock time, so replaying a log gives the same vector at any time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from llmrec.schema import (  # polarity: re-exported
    EVENT_KINDS,
    NEGATIVE_KINDS,
    NEGATIVE_MAX_RATING,
    POSITIVE_KINDS,
    POSITIVE_MIN_RATING,
    polarity,
)
from llmrec.state.errors import InvalidEvent

logger = logging.getLogger(__name__)

__all__ = [
    "Event",
    "UserState",
    "apply_event",
    "event_weight",
    "polarity",
    "new_event_id",
    "summary",
    "StateSummary",
    "HistoryEntry",
    "TextFeedbackEntry",
    "state_from_history",
    "MeanVectorizer",
    "Vectorizer",
    "state_to_dict",
    "state_from_dict",
]

_KIND_WEIGHT = {"purchase": 1.0, "like": 1.0, "click": 0.5, "view": 0.25, "skip": -0.5, "dislike": -1.0}
_EVENT_FIELDS = ("event_id", "user_id", "item_id", "event", "value", "text", "text_vec", "ts")
RATING_MIN, RATING_MAX = 0.0, 5.0

# A vectorizer maps a user state to a (D,) float32 vector in the item retrieval space, or None (cold user).
Vectorizer = Callable[["UserState"], "np.ndarray | None"]


@dataclass(frozen=True, kw_only=True)
class Event:
    """One feedback event. Build it with `Event.from_dict` (validates) or directly in trusted code."""

    event_id: str | None = None  # unique per user; the store assigns one when missing (`new_event_id`)
    user_id: str
    item_id: str | None = None  # None for text-only feedback
    event: str  # one of schema.EVENT_KINDS
    value: float | None = None  # the rating for event == "rating" (0..5)
    text: str | None = None  # free-text feedback
    text_vec: list[float] | None = None  # BERT vector of `text` (D,), computed by the ingress
    ts: float  # unix seconds

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, default_ts: float | None = None) -> Event:
        """Validate a JSON-like dict; raise ValueError naming the field, what came and what is allowed.

        `ts` defaults to `default_ts`, else the current time. Unknown keys are refused.
        """
        if not isinstance(d, Mapping):
            raise InvalidEvent(f"event must be a dict with keys {list(_EVENT_FIELDS)}, got "
                               f"{type(d).__name__}")
        unknown = sorted(set(d) - set(_EVENT_FIELDS))
        if unknown:
            raise InvalidEvent(f"event has unknown field(s) {unknown}; allowed fields: {list(_EVENT_FIELDS)}")
        user_id = _req_str(d, "user_id")
        kind = d.get("event")
        if kind not in EVENT_KINDS:
            raise InvalidEvent(f"event.event must be one of {list(EVENT_KINDS)}, got {kind!r}")
        item_id = _opt_str(d, "item_id")
        event_id = _opt_str(d, "event_id")
        text = _opt_str(d, "text")
        value = d.get("value")
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
                raise InvalidEvent(
                    f"event.value must be a number or null, got {type(value).__name__} {value!r}"
                )
            value = _to_float(value, "value")
            if not math.isfinite(value):
                raise InvalidEvent(f"event.value must be finite, got {value!r}")
        if kind == "rating":
            if value is None:
                raise InvalidEvent("event.value is required for event 'rating' (a number in [0, 5]), got "
                                   "null")
            if not RATING_MIN <= value <= RATING_MAX:
                raise InvalidEvent(
                    f"event.value for a rating must be in [{RATING_MIN}, {RATING_MAX}], got {value}"
                )
        text_vec = d.get("text_vec")
        if text_vec is not None:
            if text is None:
                raise InvalidEvent("event.text_vec was given without event.text; send the text it encodes")
            text_vec = _float_list(text_vec, "text_vec")
        if item_id is None and text is None:
            raise InvalidEvent(
                f"event {kind!r} for user {user_id!r} has neither item_id nor text; "
                "send item_id (feedback on an item) and/or text (free-text feedback)"
            )
        if item_id is None and polarity(kind, value) == 0:
            raise InvalidEvent(
                f"text-only event {kind!r} (value={value}) is neutral and cannot steer recommendations; "
                f"use one of {list(POSITIVE_KINDS + NEGATIVE_KINDS)} or a rating <= {NEGATIVE_MAX_RATING:g} "
                f"or >= {POSITIVE_MIN_RATING:g}"
            )
        ts = d.get("ts")
        if ts is None:
            ts = time.time() if default_ts is None else default_ts
        if isinstance(ts, bool) or not isinstance(ts, (int, float, np.floating, np.integer)):
            raise InvalidEvent(f"event.ts must be unix seconds (a number), got {type(ts).__name__} {ts!r}")
        ts = _to_float(ts, "ts")
        if not math.isfinite(ts) or ts < 0:
            raise InvalidEvent(f"event.ts must be finite unix seconds >= 0, got {ts!r}")
        return cls(event_id=event_id, user_id=user_id, item_id=item_id, event=kind, value=value, text=text,
                   text_vec=text_vec, ts=ts)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict with every field (the event-log record, minus `seq`)."""
        return {k: getattr(self, k) for k in _EVENT_FIELDS}

    def with_id(self, event_id: str) -> Event:
        return dataclasses.replace(self, event_id=event_id)


@dataclass
class UserState:
    """Everything the server knows about one user. Treat as immutable: `apply_event` returns a new one.

    history: (item_id, event, value, ts) tuples, oldest first, at most `history_len` (item events only).
    text_feedback: (text, polarity +1/-1, vec float32 (D,) or None) tuples, oldest first, at most `text_len`.
    vector: the user vector, float32 (D,) or None (set by the store; not part of snapshots).
    Every part is bounded: history_len, text_len, applied_len, max_negatives; `seen` by the catalog size.
    """

    user_id: str
    history: list[tuple[str, str, float | None, float]] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    negatives: dict[str, float] = field(default_factory=dict)
    text_feedback: list[tuple[str, float, np.ndarray | None]] = field(default_factory=list)
    version: int = 0
    n_events: int = 0
    last_ts: float | None = None
    vector: np.ndarray | None = None
    applied_ids: list[str] = field(default_factory=list)
    history_len: int = 200
    text_len: int = 50
    applied_len: int = 1000
    max_negatives: int = 500

    def __post_init__(self) -> None:
        for name in ("history_len", "text_len", "applied_len", "max_negatives"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"UserState.{name} must be an int >= 1, got {v!r}")
        self._applied_set = set(self.applied_ids)

    def has_applied(self, event_id: str | None) -> bool:
        """True when an event with this id was already applied (within the last `applied_len` ids)."""
        return event_id is not None and event_id in self._applied_set


def new_event_id(event: Event, *, client_ts: bool) -> str:
    """The id the server gives an event that came without one.

    With a client timestamp the id is derived from the content (user, item, kind, value, text, ts): the same
    request sent twice (an HTTP retry after a lost reply) is recognised as a duplicate. Without one, the
    server clock is the timestamp and two equal requests may be two real events: a random id, returned in
    the reply so that a client can retry with it.
    """
    if not client_ts:
        return uuid.uuid4().hex
    key = json.dumps([event.user_id, event.item_id, event.event, event.value, event.text, event.ts],
                     ensure_ascii=False)
    return "c" + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:31]


def event_weight(kind: str, value: float | None = None) -> float:
    """Signed weight of the event's item in the user vector (see the module table); its sign is
    `schema.polarity` except for "view" (+0.25: weak interest, no direction)."""
    if kind == "rating":
        pol = polarity(kind, value)
        if pol > 0:
            return (value - 3.0) / 2.0  # type: ignore[operator]
        if pol < 0:
            return -(3.0 - value) / 2.0  # type: ignore[operator]
        return 0.0
    return _KIND_WEIGHT[kind]


def apply_event(state: UserState, event: Event) -> UserState:
    """Return the state after `event` (pure: `state` is not modified).

    Raises:
        ValueError: the event belongs to another user.
    """
    if event.user_id != state.user_id:
        raise ValueError(f"event for user {event.user_id!r} applied to the state of user {state.user_id!r}")
    history = list(state.history)
    seen = set(state.seen)
    negatives = dict(state.negatives)
    text_feedback = list(state.text_feedback)
    applied = list(state.applied_ids)
    pol = polarity(event.event, event.value)
    if event.item_id is not None:
        history.append((event.item_id, event.event, event.value, event.ts))
        if len(history) > state.history_len:
            del history[: len(history) - state.history_len]
        _apply_item(seen, negatives, event.item_id, event.event, event.value, state.max_negatives)
    if event.text is not None:
        # float32 array: 1.5 KB per 384-d vector instead of ~12 KB as a list of Python floats
        vec = np.asarray(event.text_vec, dtype=np.float32) if event.text_vec else None
        text_feedback.append((event.text, float(pol), vec))
        if len(text_feedback) > state.text_len:
            del text_feedback[: len(text_feedback) - state.text_len]
    if event.event_id is not None:
        applied.append(event.event_id)
        if len(applied) > state.applied_len:
            del applied[: len(applied) - state.applied_len]
    last_ts = event.ts if state.last_ts is None else max(state.last_ts, event.ts)
    return dataclasses.replace(
        state, history=history, seen=seen, negatives=negatives, text_feedback=text_feedback,
        version=state.version + 1, n_events=state.n_events + 1, last_ts=last_ts, applied_ids=applied,
    )


def _apply_item(seen: set[str], negatives: dict[str, float], item_id: str, kind: str, value: float | None,
                max_negatives: int) -> None:
    """The `seen` / `negatives` rules of one item event (in place); shared by `apply_event` and
    `state_from_history`, so live events and base histories follow one rule."""
    seen.add(item_id)
    w = event_weight(kind, value)
    if w < 0:
        negatives[item_id] = negatives.pop(item_id, 0.0) + (-w)  # re-insert = most recent
        while len(negatives) > max_negatives:
            negatives.pop(next(iter(negatives)))
    elif polarity(kind, value) > 0:
        negatives.pop(item_id, None)


def state_from_history(user_id: str, history: Sequence[tuple[str, str, float | None, float]], *,
                       n_events: int | None = None, older_seen: Iterable[str] = (), history_len: int = 200,
                       **limits: int) -> UserState:
    """The state that folding `apply_event` over `history` gives, built in one pass (no per-event copies).

    Used for users the serving run already knows (`llmrec.state.base`): their base history becomes a
    `UserState` only when it is read or extended.

    Args:
        history: item events (item_id, event, value, ts), oldest first, without event ids; only the last
            `history_len` are kept (as `apply_event` would), negatives and `seen` see all of them.
        n_events: events the user had in total (>= len(history)): `n_events` and `version`; default
            len(history).
        older_seen: items of the user's earlier events that `history` no longer holds (added to `seen`).
        limits: other `UserState` bounds (text_len, applied_len, max_negatives).
    """
    st = UserState(user_id=user_id, history_len=history_len, **limits)
    n = len(history) if n_events is None else int(n_events)
    if n < len(history):
        raise ValueError(f"n_events={n} is below the {len(history)} events of the history of {user_id!r}")
    seen: set[str] = set(older_seen)
    negatives: dict[str, float] = {}
    for item_id, kind, value, _ts in history:
        _apply_item(seen, negatives, item_id, kind, value, st.max_negatives)
    st.history = [tuple(h) for h in history[max(0, len(history) - history_len):]]  # type: ignore[misc]
    st.seen, st.negatives = seen, negatives
    st.version = st.n_events = n
    st.last_ts = max((h[3] for h in history), default=None)
    return st


class HistoryEntry(NamedTuple):
    """One item event of a `StateSummary`'s history."""

    item_id: str
    event: str  # one of schema.EVENT_KINDS
    value: float | None  # the rating of a "rating" event
    ts: float  # unix seconds


class TextFeedbackEntry(NamedTuple):
    """One free-text feedback of a `StateSummary`."""

    text: str
    polarity: float  # +1 / -1 (`schema.polarity` of its event)
    vec: list[float] | None  # its stored text vector (D,) (the ranker scores candidates against it), or None


@dataclass(frozen=True, kw_only=True)
class StateSummary:
    """One user as the state store returns it (`UserStateShard.get`, `StateStore.get`): what the ranker reads
    (`llmrec.serve.user_view.UserView.from_state`) and, through `to_json`, the body of GET /users/{id}."""

    user_id: str
    version: int  # the user's state version (events applied, base events included)
    n_events: int
    last_ts: float | None  # the newest event's ts; None before any
    history: tuple[HistoryEntry, ...]  # item events, oldest first (at most history_len)
    seen: tuple[str, ...]  # every item the user touched, sorted
    negatives: dict[str, float]  # item_id -> push-down weight (> 0), oldest first
    text_feedback: tuple[TextFeedbackEntry, ...]  # oldest first
    vector: list[float] | None = None  # the user vector (D,); None = cold user or no vectorizer
    shard: int | None = None  # the state shard that holds the user (None outside the store)

    def to_json(self) -> dict[str, Any]:
        """The GET /users/{id} body (a public API; its keys and their order are pinned by a test): every field
        but the vectors, which stay server-side; `has_vec` per text feedback and `has_vector` instead."""
        return {
            "user_id": self.user_id,
            "version": self.version,
            "n_events": self.n_events,
            "last_ts": self.last_ts,
            "history": [h._asdict() for h in self.history],
            "seen": list(self.seen),
            "negatives": dict(self.negatives),
            "text_feedback": [{"text": t.text, "polarity": t.polarity, "has_vec": t.vec is not None}
                              for t in self.text_feedback],
            "shard": self.shard,
            "has_vector": self.vector is not None,
        }


def summary(state: UserState, *, vector: np.ndarray | Sequence[float] | None = None,
            shard: int | None = None) -> StateSummary:
    """The `StateSummary` of a state: counts, history (oldest first), seen, negatives, text feedback with each
    stored text vector, plus the user vector (D,) and shard the store gives (the state's own `vector` is not
    read: a base user's is computed by the store)."""
    return StateSummary(
        user_id=state.user_id,
        version=state.version,
        n_events=state.n_events,
        last_ts=state.last_ts,
        history=tuple(HistoryEntry(*h) for h in state.history),
        seen=tuple(sorted(state.seen)),
        negatives=dict(state.negatives),
        text_feedback=tuple(
            TextFeedbackEntry(t, p, None if vec is None else np.asarray(vec, dtype=np.float32).tolist())
            for t, p, vec in state.text_feedback
        ),
        vector=None if vector is None else np.asarray(vector, np.float32).tolist(),
        shard=shard,
    )


def state_to_dict(state: UserState) -> dict[str, Any]:
    """Full JSON-safe dump (for snapshots); `state_from_dict` inverts it exactly."""
    d = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
    d["seen"] = sorted(state.seen)
    d["history"] = [list(h) for h in state.history]
    d["text_feedback"] = [[t, p, None if v is None else np.asarray(v, np.float32).tolist()]
                          for t, p, v in state.text_feedback]
    d["vector"] = None if state.vector is None else np.asarray(state.vector, np.float32).tolist()
    return d


def state_from_dict(d: Mapping[str, Any]) -> UserState:
    d = dict(d)
    d["seen"] = set(d.get("seen", ()))
    d["history"] = [tuple(h) for h in d.get("history", ())]
    d["text_feedback"] = [(t, p, None if v is None else np.asarray(v, np.float32))
                          for t, p, v in d.get("text_feedback", ())]
    if d.get("vector") is not None:
        d["vector"] = np.asarray(d["vector"], np.float32)
    return UserState(**d)


class MeanVectorizer:
    """Zero-shot user vector from item text vectors (also the fallback when no scorer is deployed).

    u = m_pos - negative_weight * m_neg + text_weight * m_text, then L2-normalised, where
      m_pos  = sum_h r_h w_h x_h / sum_h r_h w_h  over history entries with weight w_h > 0,
      m_neg  = sum_j n_j x_j / sum_j n_j          over `negatives` (n_j = accumulated |weight|),
      m_text = sum_t r_t p_t e_t / sum_t r_t      over text feedback with a vector (p_t = +1/-1),
    r = 0.5 ** (age / half_life), age = 0 for the newest entry of its list; a group with no entries is 0.
    Items unknown to the vectorizer are skipped. Returns None (a cold user) when there is no positive
    signal (no known positive item and no positive text), or the result has zero norm.

    Args:
        item_ids: (N,) item ids.
        vectors: (N, D) float item text vectors (normally L2-normalised BERT embeddings).

    Example::

        vec = MeanVectorizer(["a", "b"], np.eye(2, dtype=np.float32))
        s = apply_event(UserState("u1"), Event(user_id="u1", item_id="a", event="like", ts=1.0))
        vec(s)  # array([1., 0.], dtype=float32)
    """

    def __init__(self, item_ids: Sequence[str] | np.ndarray, vectors: np.ndarray, *, half_life: float = 20.0,
                 negative_weight: float = 0.5, text_weight: float = 0.5) -> None:
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2:
            raise ValueError(f"vectors must be a 2-D (N, D) array, got shape {vectors.shape}")
        ids = [str(i) for i in item_ids]
        if len(ids) != vectors.shape[0]:
            raise ValueError(
                f"{len(ids)} item_ids but {vectors.shape[0]} vector rows; pass one row per item id"
            )
        if not np.isfinite(vectors).all():
            raise ValueError("vectors contain NaN or inf; re-run `llmrec embed`")
        if half_life <= 0:
            raise ValueError(f"half_life must be > 0 events, got {half_life}")
        self.vectors = vectors  # (N, D)
        self.row = {i: r for r, i in enumerate(ids)}
        if len(self.row) != len(ids):
            raise ValueError(f"item_ids has {len(ids) - len(self.row)} duplicate id(s); ids must be unique")
        self.dim = int(vectors.shape[1])
        self.half_life = float(half_life)
        self.negative_weight = float(negative_weight)
        self.text_weight = float(text_weight)

    def __call__(self, state: UserState) -> np.ndarray | None:
        """Returns: float32 (D,) L2-normalised, or None for a user with no positive signal."""
        D = self.dim
        n_hist = len(state.history)
        rows, ws = [], []
        for k, (item_id, kind, value, _ts) in enumerate(state.history):
            w = event_weight(kind, value)
            row = self.row.get(item_id)
            if w > 0 and row is not None:
                rows.append(row)
                ws.append(0.5 ** ((n_hist - 1 - k) / self.half_life) * w)
        pos_mass = float(sum(ws))
        pos = np.asarray(ws) @ self.vectors[rows].astype(np.float64) if rows else np.zeros(D)  # (D,)
        rows, ws = [], []
        for item_id, n in state.negatives.items():
            row = self.row.get(item_id)
            if row is not None and n > 0:
                rows.append(row)
                ws.append(n)
        neg_mass = float(sum(ws))
        neg = np.asarray(ws) @ self.vectors[rows].astype(np.float64) if rows else np.zeros(D)  # (D,)
        txt, txt_mass, txt_pos = np.zeros(D, np.float64), 0.0, False
        with_vec = [(p, v) for _t, p, v in state.text_feedback if v is not None and p != 0]
        for k, (p, v) in enumerate(with_vec):
            e = np.asarray(v, dtype=np.float64)
            if e.shape != (D,):
                raise ValueError(f"text feedback vector has shape {e.shape}, the item space has dim {D}; "
                                 "encode feedback text with the same model as the items")
            r = 0.5 ** ((len(with_vec) - 1 - k) / self.half_life)
            txt += r * p * e
            txt_mass += r
            txt_pos = txt_pos or p > 0
        if pos_mass == 0 and not txt_pos:
            return None
        u = np.zeros(D, np.float64)
        if pos_mass > 0:
            u += pos / pos_mass
        if neg_mass > 0:
            u -= self.negative_weight * neg / neg_mass
        if txt_mass > 0:
            u += self.text_weight * txt / txt_mass
        norm = float(np.linalg.norm(u))
        if norm < 1e-12:
            return None
        return (u / norm).astype(np.float32)


def _to_float(v: Any, key: str) -> float:
    try:
        return float(v)
    except OverflowError:  # an int beyond the float range
        raise InvalidEvent(f"event.{key} must be a number within the float range, got an integer of "
                           f"{len(str(v))} digits") from None


def _req_str(d: Mapping[str, Any], key: str) -> str:
    v = d.get(key)
    if not isinstance(v, str) or not v.strip():
        raise InvalidEvent(f"event.{key} must be a non-empty string, got {type(v).__name__} {v!r}")
    return v


def _opt_str(d: Mapping[str, Any], key: str) -> str | None:
    v = d.get(key)
    if v is None:
        return None
    return _req_str(d, key)


def _float_list(v: Any, key: str) -> list[float]:
    try:
        arr = np.asarray(v, dtype=np.float64)
    except (TypeError, ValueError):
        raise InvalidEvent(f"event.{key} must be a list of numbers, got {type(v).__name__}") from None
    if arr.ndim != 1 or arr.size == 0:
        raise InvalidEvent(f"event.{key} must be a non-empty 1-D list of numbers, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise InvalidEvent(f"event.{key} contains NaN or inf")
    arr32 = arr.astype(np.float32)  # the log stores float32: round now so that a replay equals live state
    if not np.isfinite(arr32).all():
        raise InvalidEvent(f"event.{key} has values beyond the float32 range")
    return arr32.tolist()
