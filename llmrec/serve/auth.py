"""Where the API's bearer token comes from: an environment variable or a file, never the command line.

A token on the command line is readable by every local user (`ps`, /proc/PID/cmdline) and lands in shell
history and in `pipeline.json`-style argv records; so `--auth-token T` is refused with the replacement.
Sources, in order: a file (`--auth-token-file PATH`, `auth_token_file`: a mounted Kubernetes Secret), then
an environment variable (`LLMREC_AUTH_TOKEN`, or the name given as `auth_token_env`). The token is never
logged; messages show `$LLMREC_AUTH_TOKEN` instead.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

__all__ = ["TOKEN_ENV", "read_token", "ARGV_REFUSED", "set_replica_token", "replica_token"]

TOKEN_ENV = "LLMREC_AUTH_TOKEN"
ARGV_REFUSED = (
    "--auth-token on the command line is visible to every user of the machine (ps, /proc) and in shell "
    f"history; put the token in a file (--auth-token-file PATH, mode 0600) or export {TOKEN_ENV}"
)


def read_token(file: str | os.PathLike | None, environ: Mapping[str, str], env_name: str = TOKEN_ENV
               ) -> str | None:
    """The token from `file` (whitespace stripped) or else `environ[env_name]`; None when neither is set.

    Raises:
        ValueError: the file is missing or empty, or the variable is set but blank.
    """
    if file:
        p = Path(file).expanduser()
        if not p.is_file():
            raise ValueError(f"auth token file {p} does not exist; create it (one line, mode 0600) or unset "
                             "it")
        token = p.read_text(encoding="utf-8").strip()
        if not token:
            raise ValueError(f"auth token file {p} is empty; write the token into it")
        return token
    if env_name in environ:
        token = environ[env_name].strip()
        if not token:
            raise ValueError(f"${env_name} is set but blank; set it to the token or unset it")
        return token
    return None


# The bearer token of this process's Ingress replica (one Ingress per replica process); None = auth off.
# It lives here, in a module that Serve imports by reference, because the Ingress class is shipped to the
# replica by value (its own copy of its module's globals): a global next to it would not be the one the
# FastAPI middleware reads.
_REPLICA: dict[str, str | None] = {"token": None}


def set_replica_token(token: str | None) -> None:
    _REPLICA["token"] = token


def replica_token() -> str | None:
    return _REPLICA["token"]
