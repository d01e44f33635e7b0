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
