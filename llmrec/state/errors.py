"""The two kinds of failure the serving state reports, so that callers can answer them correctly.

- `InvalidEvent` (a `ValueError`): the client sent something wrong. Nothing was written or applied; the HTTP
  API answers 422 and the client must change the request.
- `StateUnavailable` (a `RuntimeError`): a server-side fault (a full disk, a failed fsync, a shard that is
  down or restarting). Nothing was acknowledged; the HTTP API answers 503 with `Retry-After` and the client
  should retry the same request (with the same event ids, which makes the retry idempotent).

A server fault is never reported as an `InvalidEvent`: clients discard events refused as invalid.
Both classes pickle by name, so they keep their type across Ray calls (Ray re-raises them as
`RayTaskError(<class>)`, an instance of the original class).
"""

from __future__ import annotations

__all__ = ["InvalidEvent", "StateUnavailable", "LogWriteError", "LogCorruption", "SnapshotCorruption"]


class InvalidEvent(ValueError):
    """An event (or request field) that can never be accepted; the message names field, value and rule."""


class StateUnavailable(RuntimeError):
    """A write or read could not be served now; nothing was acknowledged. `retry_after_s` hints when to
    retry."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = float(retry_after_s)

    def __reduce__(self):  # keep retry_after_s across pickling (Ray)
        return (type(self), (str(self), self.retry_after_s))


class LogWriteError(StateUnavailable):
    """Appending to the event log failed (e.g. ENOSPC, EIO); the batch was rolled back, not acknowledged."""


class LogCorruption(RuntimeError):
    """A log record that is damaged somewhere other than the torn tail a crash can leave: recovery stops."""


class SnapshotCorruption(RuntimeError):
    """A user's state in a snapshot that does not parse (found when the user is first read after a restart:
    snapshot users are parsed lazily). A server fault, never a client error."""
