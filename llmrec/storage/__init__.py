"""Artifact folders on local disk or on any pyarrow / fsspec filesystem URI (s3://, gs://, hdfs://, memory://).

The public face of three modules; callers write `from llmrec import storage` and `storage.stage_in(...)`:

- `llmrec.storage.uri`: locations and one-file I/O (`is_uri`, `join`, `redact`, `shown`, `filesystem_for`,
  `filesystem_and_path`, `read_bytes`, `write_bytes`, `exists`, `shared_across_processes`);
- `llmrec.storage.staging`: artifact folders moved between a URI and a local cache (`stage_in`,
  `stage_in_run`, `stage_out`, `stage_out_file`, `localize`, `check_replaceable`, `default_cache_root`), with
  the overwrite rules (meta.json last, the `.llmrec-incomplete` / `.llmrec-added` marks);
- `llmrec.storage.flags`: the declarations a command's `storage_args(args)` returns (`In`, `Run`, `Out`,
  `OutFile`, `LocalOnly`; `Arg` is any of them).
"""

from __future__ import annotations

from llmrec.storage.flags import Arg, In, LocalOnly, Out, OutFile, Run
from llmrec.storage.staging import (
    ADDED_MARK,
    CACHE_ENV,
    DEFAULT_CACHE,
    INCOMPLETE_MARK,
    check_replaceable,
    default_cache_root,
    localize,
    stage_in,
    stage_in_run,
    stage_out,
    stage_out_file,
)
from llmrec.storage.uri import (
    exists,
    filesystem_and_path,
    filesystem_for,
    is_uri,
    join,
    read_bytes,
    redact,
    shared_across_processes,
    shown,
    write_bytes,
)

__all__ = [  # a literal list: the storage API the commands, the CLI and the tests use
    "ADDED_MARK",
    "CACHE_ENV",
    "DEFAULT_CACHE",
    "INCOMPLETE_MARK",
    "Arg",
    "In",
    "LocalOnly",
    "Out",
    "OutFile",
    "Run",
    "check_replaceable",
    "default_cache_root",
    "exists",
    "filesystem_and_path",
    "filesystem_for",
    "is_uri",
    "join",
    "localize",
    "read_bytes",
    "redact",
    "shared_across_processes",
    "shown",
    "stage_in",
    "stage_in_run",
    "stage_out",
    "stage_out_file",
    "write_bytes",
]
