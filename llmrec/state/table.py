"""A shard's materialised users: `UserState` objects, and users restored from a snapshot kept as text.

A shard restarted from a snapshot of N users used to parse every line into a `UserState` (lists, sets and
tuples for each event) before it served its first request; at 100,000 users that was most of a restart's
time and twice the memory of the text. `UserTable` keeps a restored user as its `StoredState` (the JSON text
and its event count) until something reads it, then parses it once and keeps the object. Users nobody
touches cost their text, and a full snapshot writes that text back as it was (`snapshot_items`). After a
full snapshot the shard turns the users it wrote back into text too (`to_text`), unless they changed
meanwhile: a user's object graph (~10 KB for 20 events with its vector) lives only while the user is active
between two full snapshots, its text (~1.5 KB) the rest of the time.

It is a `MutableMapping[str, UserState]`: `table[uid]` and `table.get(uid)` parse on demand; iteration and
`len` cover both kinds without parsing; `values()` / `items()` parse everything (for tests and tools).

Example::

    t = UserTable()
    t.put("u1", StoredState('{"user_id":"u1","n_events":1,...}', 1))
    t.n_events()   # 1, without parsing
    t["u1"]        # parsed now: a UserState
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, MutableMapping
from typing import Any

from llmrec.state.snapshots import SnapshotState, StoredState, state_text
from llmrec.state.user_state import UserState, state_from_dict

__all__ = ["UserTable"]


class UserTable(MutableMapping[str, UserState]):
    """user_id -> `UserState`, where users restored from a snapshot stay unparsed until first read."""

    __slots__ = ("_live", "_stored", "_stored_events")

    def __init__(self) -> None:
        self._live: dict[str, UserState] = {}
        self._stored: dict[str, StoredState] = {}
        self._stored_events = 0  # sum of n_events over _stored

    def put(self, user_id: str, st: SnapshotState) -> None:
        """Add or replace a user from a snapshot (a `StoredState` stays unparsed; a dict is parsed now)."""
        if isinstance(st, StoredState):
            self.discard(user_id)
            self._stored[user_id] = st
            self._stored_events += st.n_events
        else:
            self[user_id] = state_from_dict(st)

    def __getitem__(self, user_id: str) -> UserState:
        st = self._live.get(user_id)
        if st is None:
            st = state_from_dict(self._stored[user_id].load())  # KeyError for an unknown user
            self[user_id] = st
        return st

    def __setitem__(self, user_id: str, st: UserState) -> None:
        self.discard(user_id)
        self._live[user_id] = st

    def __delitem__(self, user_id: str) -> None:
        if self.discard(user_id) is None:
            raise KeyError(user_id)

    def discard(self, user_id: str) -> int | None:
        """Remove the user without parsing it; its `n_events`, or None when it is not here."""
        st = self._live.pop(user_id, None)
        if st is not None:
            return st.n_events
        stored = self._stored.pop(user_id, None)
        if stored is None:
            return None
        self._stored_events -= stored.n_events
        return stored.n_events

    def __contains__(self, user_id: object) -> bool:
        return user_id in self._live or user_id in self._stored

    def __iter__(self) -> Iterator[str]:
        yield from list(self._live)
        yield from list(self._stored)

    def __len__(self) -> int:
        return len(self._live) + len(self._stored)

    def n_events(self) -> int:
        """Sum of `n_events` over every user (stored users by their recorded count, without parsing)."""
        return sum(s.n_events for s in self._live.values()) + self._stored_events

    @property
    def n_parsed(self) -> int:
        """Users held as `UserState` objects (the rest are still snapshot text)."""
        return len(self._live)

    def copy(self) -> UserTable:
        """A shallow copy (states are replaced, never mutated in place, by the shard: a snapshot of them)."""
        t = UserTable()
        t._live, t._stored, t._stored_events = dict(self._live), dict(self._stored), self._stored_events
        return t

    def snapshot_items(self, to_dict: Callable[[UserState], dict[str, Any]],
                       written: dict[str, tuple[UserState, StoredState]] | None = None
                       ) -> Iterator[tuple[str, SnapshotState]]:
        """(user_id, state) for every user: parsed users as the `StoredState` of `to_dict(state)`'s JSON, the
        rest unchanged. With `written`, each parsed user's (state object, its StoredState) is recorded there,
        for `to_text` once the snapshot is durable."""
        for uid, st in self._live.items():
            text, n_events = state_text(to_dict(st))
            stored = StoredState(text, n_events, "a snapshot written by this shard")
            if written is not None:
                written[uid] = (st, stored)
            yield uid, stored
        yield from self._stored.items()

    def to_text(self, written: dict[str, tuple[UserState, StoredState]]) -> list[str]:
        """Keep users whose state is still the object `snapshot_items` wrote as that text (they are parsed
        again on their next read); returns their ids. A user changed since (a new state object) stays."""
        done = [uid for uid, (st, _stored) in written.items() if self._live.get(uid) is st]
        for uid in done:
            self.put(uid, written[uid][1])
        return done
