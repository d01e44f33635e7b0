"""What the ranker reads of a request: the user (`UserView`, from a state summary, a `UserState` or nothing)
and the free-text query (`Query`); numpy only, no Ray, no HTTP. `llmrec.serve.recommend_core` ranks them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from llmrec import schema

if TYPE_CHECKING:
    from llmrec.state.user_state import StateSummary, UserState


@dataclass
class UserView:
    """What the ranker needs from a user's state (a `StateSummary`, a `UserState`, or nothing)."""

    user_id: str
    history: list[tuple[str, str, float | None, float]] = field(
        default_factory=list
    )  # (item, event, value, ts)
    seen: set[str] = field(default_factory=set)
    negatives: dict[str, float] = field(default_factory=dict)
    text_feedback: list[tuple[str, float, np.ndarray | None]] = field(
        default_factory=list
    )  # (text, pol, vec)
    vector: np.ndarray | None = None  # (D,) text-space user vector
    version: int = 0

    @classmethod
    def from_state(cls, state: StateSummary | UserState | Mapping[str, Any] | None,
                   user_id: str | None = None) -> UserView:
        """Accepts None (new user), a `StateSummary` (as `StateStore.get` returns), a `UserState`, or a dict
        with the same keys (`history` entries as dicts or tuples)."""
        if state is None:
            return cls(user_id=user_id or "")
        get = state.get if isinstance(state, Mapping) else (lambda k, d=None: getattr(state, k, d))
        hist = [_history_entry(h) for h in (get("history") or [])]
        seen = {str(s) for s in (get("seen") or [])} | {h[0] for h in hist if h[0]}
        neg_raw = get("negatives") or {}
        negatives = {
            str(k): float(v) for k, v in (neg_raw.items() if isinstance(neg_raw, Mapping) else neg_raw)
        }
        tf = [_text_entry(t) for t in (get("text_feedback") or [])]
        vec = get("vector")
        vec = None if vec is None or len(vec) == 0 else np.asarray(vec, dtype=np.float32)
        return cls(
            user_id=str(get("user_id") or user_id or ""),
            history=hist,
            seen=seen,
            negatives=negatives,
            text_feedback=tf,
            vector=vec,
            version=int(get("version") or get("state_version") or 0),
        )

    def positives(self) -> list[tuple[str, str]]:
        """(item_id, event) of the explicitly positive history (`schema.is_positive`), newest first: the items
        a reason may name as liked. Views and mid ratings have no direction (as in replay and the state)."""
        out = []
        for item, ev, val, _ in reversed(self.history):
            if item and schema.is_positive(ev, val):
                out.append((item, ev))
        return out


def _history_entry(h: Any) -> tuple[str, str, float | None, float]:
    if isinstance(h, Mapping):
        item, ev, val, ts = h.get("item_id"), h.get("event"), h.get("value"), h.get("ts", 0.0)
    else:
        item, ev, val, ts = (list(h) + [None, None, None, 0.0])[:4]
    return (
        str(item) if item is not None else "",
        str(ev),
        None if val is None else float(val),
        float(ts or 0.0),
    )


def _text_entry(t: Any) -> tuple[str, float, np.ndarray | None]:
    if isinstance(t, Mapping):
        text, pol, vec = t.get("text"), t.get("polarity", 0.0), t.get("vec", t.get("text_vec"))
    else:
        text, pol, vec = (list(t) + [None, 0.0, None])[:3]
    return str(text), float(pol or 0.0), None if vec is None else np.asarray(vec, dtype=np.float32)


@dataclass
class Query:
    text: str
    vector: np.ndarray  # (D,) L2-normalised, text space
