"""Pure user state: event validation, apply_event bookkeeping, MeanVectorizer math on hand-built vectors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from llmrec.state.user_state import (
    Event,
    HistoryEntry,
    MeanVectorizer,
    StateSummary,
    TextFeedbackEntry,
    UserState,
    apply_event,
    event_weight,
    polarity,
    state_from_dict,
    state_from_history,
    state_to_dict,
    summary,
)


def ev(kind: str, item: str | None = None, *, user: str = "u1", ts: float = 1.0, **kw) -> Event:
    return Event.from_dict({"user_id": user, "item_id": item, "event": kind, "ts": ts, **kw})


def run(events: list[Event], user: str = "u1", **state_kw) -> UserState:
    s = UserState(user_id=user, **state_kw)
    for e in events:
        s = apply_event(s, e)
    return s


def cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# ---- validation --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad, fragment",
    [
        ({"user_id": "u", "item_id": "i", "event": "love"}, "event.event must be one of"),
        ({"user_id": "", "item_id": "i", "event": "like"}, "event.user_id must be a non-empty string"),
        ({"user_id": 5, "item_id": "i", "event": "like"}, "event.user_id must be a non-empty string"),
        ({"user_id": "u", "event": "like"}, "neither item_id nor text"),
        ({"user_id": "u", "item_id": "i", "event": "rating"}, "value is required for event 'rating'"),
        ({"user_id": "u", "item_id": "i", "event": "rating", "value": 7}, "must be in [0.0, 5.0]"),
        ({"user_id": "u", "item_id": "i", "event": "like", "value": "x"}, "event.value must be a number"),
        ({"user_id": "u", "item_id": "i", "event": "like", "value": True}, "event.value must be a number"),
        ({"user_id": "u", "item_id": "i", "event": "like", "value": float("nan")}, "must be finite"),
        ({"user_id": "u", "item_id": "i", "event": "like", "ts": "yes"}, "event.ts must be unix seconds"),
        ({"user_id": "u", "item_id": "i", "event": "like", "ts": -1}, "finite unix seconds >= 0"),
        ({"user_id": "u", "item_id": "i", "event": "like", "colour": "red"}, "unknown field(s) ['colour']"),
        ({"user_id": "u", "event": "view", "text": "hmm"}, "neutral and cannot steer"),
        ({"user_id": "u", "event": "like", "text_vec": [1.0]}, "text_vec was given without event.text"),
        ({"user_id": "u", "event": "like", "text": "t", "text_vec": [1.0, float("inf")]}, "NaN or inf"),
        ({"user_id": "u", "event": "like", "text": "t", "text_vec": [[1.0]]}, "1-D list of numbers"),
    ],
)
def test_event_validation_names_field_and_allowed(bad: dict, fragment: str) -> None:
    with pytest.raises(ValueError) as ei:
        Event.from_dict(bad)
    assert fragment in str(ei.value)


def test_event_validation_lists_allowed_kinds_and_accepts_good_events() -> None:
    allowed = r"\['view', 'click', 'like', 'dislike', 'skip', 'purchase', 'rating'\]"
    with pytest.raises(ValueError, match=allowed):
        Event.from_dict({"user_id": "u", "item_id": "i", "event": "LIKE"})
    e = Event.from_dict({"user_id": "u", "item_id": "i", "event": "rating", "value": 4, "ts": 10})
    assert (e.value, e.ts, e.event_id) == (4.0, 10.0, None)
    t = Event.from_dict({"user_id": "u", "event": "dislike", "text": "no horror", "text_vec": [0, 1]})
    assert t.item_id is None and t.text_vec == [0.0, 1.0] and t.ts > 1.7e9  # ts defaults to now
    assert Event.from_dict(e.to_dict()) == e  # round trip


def test_polarity_and_weights_follow_the_table() -> None:
    kinds = ("like", "purchase", "click", "view", "dislike", "skip")
    assert [polarity(k) for k in kinds] == [1, 1, 1, 0, -1, -1]
    assert [polarity("rating", v) for v in (5, 4, 3.5, 3, 2, 1)] == [1, 1, 0, 0, -1, -1]
    assert [event_weight("rating", v) for v in (5, 4, 3, 2, 1)] == [1.0, 0.5, 0.0, -0.5, -1.0]
    assert event_weight("view") == 0.25 and event_weight("skip") == -0.5


# ---- apply_event ---------------------------------------------------------------------------------------


def test_apply_event_is_pure_and_counts() -> None:
    s0 = UserState(user_id="u1")
    s1 = apply_event(s0, ev("like", "a", ts=5.0, event_id="e1"))
    assert (s0.version, s0.n_events, s0.history, s0.seen) == (0, 0, [], set())  # input untouched
    assert (s1.version, s1.n_events, s1.last_ts) == (1, 1, 5.0)
    assert s1.history == [("a", "like", None, 5.0)] and s1.seen == {"a"}
    assert s1.has_applied("e1") and not s0.has_applied("e1")
    with pytest.raises(ValueError, match="applied to the state of user 'u1'"):
        apply_event(s1, ev("like", "a", user="u2"))


def test_negatives_accumulate_and_positive_clears() -> None:
    s = run([ev("dislike", "a"), ev("skip", "a"), ev("skip", "b"), ev("rating", "c", value=1)])
    assert s.negatives == {"a": 1.5, "b": 0.5, "c": 1.0}
    s = apply_event(s, ev("like", "a"))
    assert s.negatives == {"b": 0.5, "c": 1.0} and s.seen == {"a", "b", "c"}
    s = apply_event(s, ev("view", "b"))  # neutral: no change to negatives
    assert s.negatives == {"b": 0.5, "c": 1.0}


def test_bounded_history_text_ids_and_negatives() -> None:
    events = [ev("click", f"i{k}", ts=float(k), event_id=f"e{k}") for k in range(30)]
    events += [ev("dislike", text=f"t{k}", event_id=f"x{k}") for k in range(7)]
    events += [ev("skip", f"n{k}") for k in range(6)]
    s = run(events, history_len=10, text_len=3, applied_len=5, max_negatives=4)
    assert [h[0] for h in s.history] == [f"i{k}" for k in range(26, 30)] + [f"n{k}" for k in range(6)]
    assert [t[0] for t in s.text_feedback] == ["t4", "t5", "t6"] and all(t[1] == -1 for t in s.text_feedback)
    assert s.applied_ids == ["x2", "x3", "x4", "x5", "x6"] and not s.has_applied("e29")
    assert list(s.negatives) == ["n2", "n3", "n4", "n5"]
    assert s.n_events == 43 and len(s.seen) == 36  # seen is not bounded


def test_state_from_history_equals_folding_apply_event() -> None:
    rng = np.random.default_rng(3)
    kinds = ["view", "click", "like", "dislike", "skip", "purchase", "rating"]
    hist = []
    for k in range(60):
        kind = kinds[rng.integers(len(kinds))]
        value = float(rng.integers(1, 6)) if kind == "rating" else None
        hist.append((f"i{rng.integers(12)}", kind, value, float(k)))
    ref = run([Event(user_id="u1", item_id=i, event=e, value=v, ts=t) for i, e, v, t in hist],
              history_len=25, max_negatives=3)
    got = state_from_history("u1", hist, history_len=25, max_negatives=3)
    assert state_to_dict(got) == state_to_dict(ref)  # history window, seen, negatives (capped), counts
    more = state_from_history("u1", hist[-25:], n_events=60, older_seen=["old-1", "i3"], history_len=25)
    assert more.n_events == more.version == 60 and more.last_ts == 59.0
    assert more.seen == {h[0] for h in hist[-25:]} | {"old-1", "i3"}
    with pytest.raises(ValueError, match="n_events=3 is below the 25 events"):
        state_from_history("u1", hist[-25:], n_events=3)


# The body of GET /users/{id} (a public API) for the state below, as the ingress built it from the summary
# dict before the summary was typed (computed with that code: keys, their order and values, byte for byte).
USERS_BODY = (
    '{"user_id": "u1", "version": 3, "n_events": 3, "last_ts": 2.0, "history": [{"item_id": "a", '
    '"event": "like", "value": null, "ts": 2.0}, {"item_id": "b", "event": "rating", "value": 2.0, '
    '"ts": 1.0}], "seen": ["a", "b"], "negatives": {"b": 0.5}, "text_feedback": [{"text": "no gore", '
    '"polarity": -1.0, "has_vec": true}], "shard": 1, "has_vector": true}'
)


def test_summary_is_typed_and_its_json_is_the_users_api_body() -> None:
    import json

    s = run([ev("like", "a", ts=2.0), ev("dislike", text="no gore", text_vec=[0.0, 1.0]),
             ev("rating", "b", value=2)])
    got = summary(s, vector=np.array([0.6, 0.8], np.float32), shard=1)
    assert isinstance(got, StateSummary) and (got.user_id, got.version, got.n_events, got.last_ts) == (
        "u1", 3, 3, 2.0)
    assert got.history == (HistoryEntry("a", "like", None, 2.0), HistoryEntry("b", "rating", 2.0, 1.0))
    assert got.seen == ("a", "b") and got.negatives == {"b": 0.5}
    # the stored text vector travels with the summary (the ranker scores against it), never in the body
    assert got.text_feedback == (TextFeedbackEntry("no gore", -1.0, [0.0, 1.0]),)
    assert got.vector == [np.float32(0.6), np.float32(0.8)] and got.shard == 1
    assert json.dumps(got.to_json()) == USERS_BODY
    cold = summary(UserState(user_id="c"))
    assert cold.vector is None and cold.shard is None and cold.to_json()["has_vector"] is False
    with pytest.raises(dataclasses.FrozenInstanceError):
        got.version = 4  # type: ignore[misc]


def test_snapshot_dict_round_trips() -> None:
    import json

    s = run([ev("like", "a", ts=2.0), ev("dislike", text="no gore", text_vec=[0.0, 1.0]),
             ev("rating", "b", value=2)])
    back = state_from_dict(json.loads(json.dumps(state_to_dict(s))))
    assert state_to_dict(back) == state_to_dict(s) and back.seen == s.seen


# ---- MeanVectorizer ------------------------------------------------------------------------------------

V = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0.6, 0.8, 0, 0]], dtype=np.float32)
IDS = ["a", "b", "c", "d"]


def test_mean_vectorizer_equals_hand_computed_weighted_mean() -> None:
    vec = MeanVectorizer(IDS, V, half_life=1.0, negative_weight=0.5, text_weight=0.5)
    # history: like a (age 2), click b (age 1), dislike c (age 0); text like e=[0,0,0,1]
    s = run([ev("like", "a"), ev("click", "b"), ev("dislike", "c"),
             ev("like", text="more of this", text_vec=[0, 0, 0, 1])])
    # positives: a: r=0.5**2=0.25, w=1 -> 0.25; b: r=0.5**1, w=0.5 -> 0.25  => m_pos = (a + b) / 2
    m_pos = (0.25 * V[0] + 0.25 * V[1]) / 0.5
    m_neg = V[2]  # only c, weight 1
    m_text = np.array([0, 0, 0, 1.0])
    u = m_pos - 0.5 * m_neg + 0.5 * m_text
    np.testing.assert_allclose(vec(s), u / np.linalg.norm(u), rtol=1e-6)
    assert vec(s).dtype == np.float32 and abs(np.linalg.norm(vec(s)) - 1) < 1e-6


def test_recency_weights_newer_items_more() -> None:
    vec = MeanVectorizer(IDS, V, half_life=2.0)
    s = run([ev("like", "a"), ev("like", "b")])
    r_a = 0.5 ** (1 / 2.0)  # a is one event older
    u = (r_a * V[0] + V[1]) / (r_a + 1)
    np.testing.assert_allclose(vec(s), u / np.linalg.norm(u), rtol=1e-6)
    assert vec(s)[1] > vec(s)[0]


def test_dislike_moves_vector_away_and_negative_text_reduces_cosine() -> None:
    vec = MeanVectorizer(IDS, V)
    base = run([ev("like", "a"), ev("like", "d")])
    after = apply_event(base, ev("dislike", "b"))
    assert cos(vec(after), V[1]) < cos(vec(base), V[1]) - 0.1
    e = np.array([0.0, 0.6, 0.0, 0.8])  # the text's vector
    txt = apply_event(base, ev("dislike", text="less of b", text_vec=e.tolist()))
    assert cos(vec(txt), e) < cos(vec(base), e) - 0.1
    pos = apply_event(base, ev("like", text="more of b", text_vec=e.tolist()))
    assert cos(vec(pos), e) > cos(vec(base), e) + 0.1


def test_mean_vectorizer_cold_and_unknown_items_and_bad_input() -> None:
    vec = MeanVectorizer(IDS, V)
    assert vec(UserState(user_id="u1")) is None
    assert vec(run([ev("dislike", "a")])) is None  # no positive signal
    assert vec(run([ev("like", "zzz")])) is None  # unknown item only
    np.testing.assert_allclose(vec(run([ev("like", "zzz"), ev("like", "c")])), V[2])
    with pytest.raises(ValueError, match="3 item_ids but 4 vector rows"):
        MeanVectorizer(IDS[:3], V)
    with pytest.raises(ValueError, match="duplicate"):
        MeanVectorizer(["a", "a", "b", "c"], V)
    with pytest.raises(ValueError, match="dim 4"):
        vec(run([ev("like", "a"), ev("like", text="t", text_vec=[1.0, 0.0])]))


def test_numbers_beyond_the_float_range_are_invalid_events_not_crashes() -> None:
    """ts or value as an integer too large for a float used to raise OverflowError (an HTTP 500)."""
    import pytest

    from llmrec.serve.schemas import parse_feedback
    from llmrec.state.errors import InvalidEvent

    huge = 10**400
    for field in ("ts", "value"):
        body = {"user_id": "u", "item_id": "i", "event": "rating", "value": 3, field: huge}
        with pytest.raises(ValueError, match=rf"{field}.*float range"):
            parse_feedback(body)
        with pytest.raises(InvalidEvent, match=rf"event.{field} must be a number within the float range"):
            Event.from_dict(body)
