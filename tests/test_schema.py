"""The one polarity table (llmrec.schema.polarity): pinned, and the state's weights follow its signs."""

from __future__ import annotations

import pytest

from llmrec import schema
from llmrec.state import user_state


def test_polarity_table_is_pinned() -> None:
    table = {
        ("view", None): 0, ("click", None): 1, ("like", None): 1, ("dislike", None): -1, ("skip", None): -1,
        ("purchase", None): 1, ("rating", None): 0, ("rating", 5.0): 1, ("rating", 4.0): 1,
        ("rating", 3.9): 0, ("rating", 3.0): 0, ("rating", 2.1): 0, ("rating", 2.0): -1, ("rating", 0.0): -1,
    }
    assert {c: schema.polarity(*c) for c in table} == table
    assert {c: schema.is_positive(*c) for c in table} == {c: p > 0 for c, p in table.items()}
    assert {e for e, _ in table} == set(schema.EVENT_KINDS)  # every kind is in the table


@pytest.mark.parametrize("kind,value", [(k, None) for k in schema.EVENT_KINDS if k != "rating"]
                         + [("rating", v) for v in (0.0, 1.0, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0)])
def test_state_uses_the_schema_polarity(kind: str, value: float | None) -> None:
    """The state's polarity is the schema's; an item's weight in the user vector has the same sign, except
    views (weak interest: +0.25, but no direction for text feedback, reasons or replay)."""
    assert user_state.polarity(kind, value) == schema.polarity(kind, value)
    w = user_state.event_weight(kind, value)
    sign = (w > 0) - (w < 0)
    assert sign == (1 if kind == "view" else schema.polarity(kind, value))


def test_feedback_event_becomes_one_typed_event_at_the_edge() -> None:
    """`FeedbackEvent.to_event` is the one conversion of an HTTP event: the state's rules, the id, the ts;
    the store routes that object to its shard as it is (no dict round trip, no second validation)."""
    from types import SimpleNamespace

    from llmrec.serve.schemas import parse_feedback
    from llmrec.state.errors import InvalidEvent
    from llmrec.state.store import StateStore, shard_of
    from llmrec.state.user_state import Event, new_event_id

    body = {"events": [{"user_id": "u", "item_id": "i", "event": "rating", "value": 4, "ts": 10},
                       {"user_id": "u", "item_id": "i", "event": "like"},
                       {"user_id": "v", "item_id": "j", "event": "view", "event_id": "mine"},
                       {"user_id": "u", "event": "dislike", "text": "no horror"}]}
    a, b, c, d = parse_feedback(body)
    ea = a.to_event(text_vec=None, now=99.0)
    assert isinstance(ea, Event) and (ea.value, ea.ts) == (4.0, 10.0)
    assert ea.event_id == new_event_id(ea, client_ts=True) == a.to_event(text_vec=None, now=5.0).event_id
    eb = b.to_event(text_vec=None, now=99.0)
    assert eb.ts == 99.0  # the server clock, and a random id (no client ts: two equal requests, two events)
    assert eb.event_id != b.to_event(text_vec=None, now=99.0).event_id
    assert c.to_event(text_vec=None, now=99.0).event_id == "mine"
    assert d.to_event(text_vec=[0.6, 0.8], now=1.0).text_vec == pytest.approx([0.6, 0.8])
    neutral = parse_feedback({"user_id": "u", "event": "rating", "value": 3, "text": "meh"})[0]
    with pytest.raises(InvalidEvent, match="neutral"):  # a state rule the HTTP schema does not know
        neutral.to_event(text_vec=None, now=1.0)

    events = [ea, eb, c.to_event(text_vec=None, now=1.0)]
    groups = StateStore._route(SimpleNamespace(n_shards=3), events)  # type: ignore[arg-type]
    routed = {i: ev for g in groups.values() for i, ev in g}
    assert all(routed[i] is events[i] for i in range(3))  # the very objects, not re-validated copies
    assert all(s == shard_of(ev.user_id, 3) for s, g in groups.items() for _, ev in g)
