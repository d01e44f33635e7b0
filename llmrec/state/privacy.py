"""Keyed hashing of user ids: what tombstones and logs keep instead of the ids.

An unsalted hash of a user id (sha256, crc32) is reversible by dictionary: hash every plausible id (emails,
account numbers) and compare. Everything here is an HMAC-SHA256 under a secret key instead, so a tombstone
file or a log line tells nothing about a user to someone without the key.

The key is 32 random bytes in a file (`hash-key` in the event-log folder unless the store is given another
path, e.g. a mounted Kubernetes Secret), created with mode 0600 on first use. Keep it out of backups that
leave the serving machines; losing it makes existing tombstones unmatchable (deleted users' base histories
would load again), so back it up with the log, not with the exports.

Derived keys (one secret, separate uses): `tombstone_key(user_id)` (hex, 64 chars) and `log_id(user_id)`
(`u:` + 12 hex chars, stable across processes and restarts, so log lines of one user can be correlated).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from pathlib import Path

__all__ = ["UserKeyer", "load_or_create_key"]

_KEY_BYTES = 32


class UserKeyer:
    """HMAC-SHA256 of user ids under one secret (see the module docstring).

    Example::

        k = UserKeyer(b"\\0" * 32)
        k.log_id("alice")  # 'u:' + 12 hex chars, the same in every process with this key
    """

    def __init__(self, secret: bytes) -> None:
        if not isinstance(secret, bytes) or len(secret) < 16:
            raise ValueError(f"the hash key must be at least 16 bytes, got {len(secret or b'')}")
        self._tomb = hmac.new(secret, b"llmrec tombstones v1", hashlib.sha256).digest()
        self._log = hmac.new(secret, b"llmrec log ids v1", hashlib.sha256).digest()

    def tombstone_key(self, user_id: str) -> str:
        return hmac.new(self._tomb, user_id.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()

    def log_id(self, user_id: str) -> str:
        return "u:" + hmac.new(self._log, user_id.encode("utf-8", "surrogatepass"),
                               hashlib.sha256).hexdigest()[:12]

    def log_key(self) -> bytes:
        """The derived key of `log_id` (for another process that logs the same ids, e.g. the ingress)."""
        return self._log

    @classmethod
    def for_logs(cls, log_key: bytes) -> UserKeyer:
        """A keyer whose `log_id` equals the one of the keyer that gave `log_key` (no tombstone use)."""
        k = cls.__new__(cls)
        k._tomb, k._log = b"", bytes(log_key)
        return k


def load_or_create_key(path: str | os.PathLike, timeout_s: float = 10.0) -> bytes:
    """Read the key file; create it (0600, 32 random bytes) when missing. Several processes may race: the
    file is linked into place atomically, so all of them end up with the same key."""
    p = Path(path)
    if not p.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, secrets.token_bytes(_KEY_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, p)  # atomic; fails if another process was first
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    deadline = time.monotonic() + timeout_s
    while True:
        key = p.read_bytes()
        if len(key) >= 16:
            return key
        if time.monotonic() > deadline:
            raise ValueError(f"hash key file {p} holds {len(key)} bytes, expected >= 16; restore it from the "
                             "backup of the event log (without it tombstones cannot be matched)")
        time.sleep(0.05)
