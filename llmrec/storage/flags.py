"""The storage declarations of a command's flags: which name an input artifact (`In`, `Run`), an output
(`Out`, `OutFile`), or a folder that must stay on local disk (`LocalOnly`).

Each command module's `storage_args(args)` returns {flag dest: declaration}; `llmrec.cli` hands it to
`llmrec.storage.localize`, which stages the URIs among those flags in and out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class In:
    """An input folder or file. `stage`: the command that writes it (its meta.json is then required).

    `by_listing`: a folder that grows while its meta.json stays the same (the serving event log): the cached
    copy is reused only while the remote file names, sizes and mtimes are unchanged (see `stage_in`).
    """

    stage: str | None = None
    by_listing: bool = False


@dataclass(frozen=True)
class Run:
    """An input run folder; `parts` are the sub-artifacts the command reads (missing ones are left out)."""

    parts: tuple[str, ...]


@dataclass(frozen=True)
class Out:
    """An output artifact folder; `mode` as in `stage_out`."""

    mode: Literal["replace", "update", "add"] = "replace"


@dataclass(frozen=True)
class OutFile:
    """An output file (e.g. a parquet of recommendations)."""


@dataclass(frozen=True)
class LocalOnly:
    """A folder that must be on local disk; `why` is the reason a URI is refused."""

    why: str


Arg = In | Run | Out | OutFile | LocalOnly
