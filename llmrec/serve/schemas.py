"""Request and response models of the llmrec HTTP API (pydantic v2), plus the one error formatter.

The ingress parses bodies itself (size-limited, `json.loads`) and validates them with these models, so every
client mistake becomes a 4xx `{"error": "..."}` that names the field, what came and what is allowed. A
feedback event becomes one typed `llmrec.state.user_state.Event` here (`FeedbackEvent.to_event`: the state's
rules checked once, its id given); the state store, its shards and the event log take that object as it is.
Limits (documented in the OpenAPI schema at /docs): ids <= 256 chars, text <= 2000 chars, <= 1000 events
per request, bodies <= `MAX_BODY_BYTES` (the ingress may be configured lower).
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from llmrec.schema import EVENT_KINDS, MAX_ID_CHARS
from llmrec.state.user_state import Event, new_event_id

MAX_TEXT_CHARS = 2000
MAX_EVENTS = 1000
MAX_BODY_BYTES = 1 << 20  # 1 MiB
MAX_K = 200
MAX_QUERY_CHARS = 1000

EventKind = Literal["view", "click", "like", "dislike", "skip", "purchase", "rating"]
assert tuple(EventKind.__args__) == EVENT_KINDS, "EventKind must list schema.EVENT_KINDS in order"  # type: ignore[attr-defined]


def printable(v: str) -> bool:
    """Non-blank and free of control characters (tabs and newlines allowed): the rule for every id and text
    field, in bodies and in query/path parameters alike."""
    return bool(v.strip()) and not any(ord(c) < 32 and c not in "\t\n" for c in v)


class FeedbackEvent(BaseModel):
    """One feedback event. `item_id` may be omitted only for pure text feedback (`text` given)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    user_id: str = Field(min_length=1, max_length=MAX_ID_CHARS)
    item_id: str | None = Field(default=None, min_length=1, max_length=MAX_ID_CHARS)
    event: EventKind
    value: float | None = None  # the rating for event "rating" (required there); ints are accepted
    text: str | None = Field(default=None, min_length=1, max_length=MAX_TEXT_CHARS)
    ts: float | None = None  # unix seconds; the server clock when missing
    event_id: str | None = Field(default=None, min_length=1, max_length=MAX_ID_CHARS)  # idempotency key

    @field_validator("value", "ts", mode="before")
    @classmethod
    def _finite_number(cls, v: Any) -> Any:
        if v is None:
            return v
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"must be a number, got {type(v).__name__}")
        try:
            f = float(v)
        except OverflowError:  # an int beyond the float range (1e309 written as digits)
            raise ValueError(f"must be a number within the float range, got an integer of {len(str(v))} "
                             "digits") from None
        if not math.isfinite(f):
            raise ValueError(f"must be finite, got {v!r}")
        return f

    @field_validator("user_id", "item_id", "event_id", "text")
    @classmethod
    def _printable(cls, v: str | None) -> str | None:
        if v is not None and not printable(v):
            raise ValueError("must be non-blank and free of control characters")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> FeedbackEvent:
        if self.item_id is None and self.text is None:
            raise ValueError(
                "give item_id (the item the feedback is about) or text (free-text feedback), or both"
            )
        if self.event == "rating":
            if self.value is None:
                raise ValueError("event 'rating' needs a numeric value (e.g. 4.5)")
            if not 0.0 <= self.value <= 5.0:
                raise ValueError(f"rating value must be within [0, 5], got {self.value}")
        if self.ts is not None and not 0.0 <= self.ts < 1e11:
            raise ValueError(f"ts must be unix seconds within [0, 1e11), got {self.ts}")
        return self


    def to_event(self, *, text_vec: list[float] | None, now: float) -> Event:
        """The one typed `Event` of this request event, checked once against the state's rules
        (`Event.from_dict`; raises `InvalidEvent`) and given its id here: a client-sent id as is, else one
        derived from the content when the client sent a ts (a resent body is a duplicate), else a random one.

        Args:
            text_vec: the encoder's vector (D,) of `text` (None when there is no text).
            now: the server clock, the ts of an event sent without one.
        """
        d = self.model_dump()
        if self.text is not None:
            d["text_vec"] = text_vec
        ev = Event.from_dict(d, default_ts=now)
        return ev if ev.event_id else ev.with_id(new_event_id(ev, client_ts=self.ts is not None))


class FeedbackBatch(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    events: list[FeedbackEvent] = Field(min_length=1, max_length=MAX_EVENTS)


class FeedbackResponse(BaseModel):
    ok: bool
    state_version: int  # the version of the (last) user's state after this request
    n_events: int = 1
    duplicates: int = 0
    # the id of each event, in request order: the client's own, or the one the server gave it (derived from
    # the content when the event has a ts, so resending the same body is a duplicate; random otherwise).
    # Resend an event with its id after a lost reply or a 503, and it counts once.
    event_ids: list[str] = []
    # events refused because they predate a DELETE of their user (retries or requests in flight)
    deleted: int = 0


class RecommendedItem(BaseModel):
    item_id: str
    score: float
    title: str
    reason: str


class RecommendResponse(BaseModel):
    user_id: str
    items: list[RecommendedItem]
    state_version: int
    model_version: str


class ErrorResponse(BaseModel):
    error: str


def parse_feedback(payload: Any) -> list[FeedbackEvent]:
    """A decoded JSON body -> validated events; raises ValueError with a client-facing message."""
    if not isinstance(payload, dict):
        raise ValueError(
            f'body must be a JSON object (one event or {{"events": [...]}}), got {type(payload).__name__}'
        )
    try:
        if "events" in payload:
            return list(FeedbackBatch.model_validate(payload).events)
        return [FeedbackEvent.model_validate(payload)]
    except ValidationError as e:
        raise ValueError(format_validation_error(e)) from None


def format_validation_error(e: ValidationError | Any, max_errors: int = 3) -> str:
    """pydantic/FastAPI errors -> one line: `field: message (got ...)`; at most `max_errors` listed."""
    errors = e.errors() if hasattr(e, "errors") else list(e)
    parts = []
    for err in errors[:max_errors]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x not in ("body",)) or "body"
        got = err.get("input")
        got_s = repr(got)
        if len(got_s) > 60:
            got_s = got_s[:57] + "..."
        msg = err.get("msg", "invalid")
        parts.append(
            f"{loc}: {msg} (got {got_s})" if err.get("type") != "missing" else f"{loc}: field required"
        )
    more = f"; and {len(errors) - max_errors} more" if len(errors) > max_errors else ""
    allowed = (
        f" Allowed events: {', '.join(EVENT_KINDS)}."
        if any("event" in str(x.get("loc")) for x in errors)
        else ""
    )
    return "invalid request: " + "; ".join(parts) + more + "." + allowed
