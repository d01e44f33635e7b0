"""Locations: local paths and filesystem URIs (s3://, gs://, hdfs://, file://, fsspec's memory://, ...), and
one-file I/O at either.

A URI is `scheme://...`; everything else is a local path. `filesystem_for` opens a URI with pyarrow's own
filesystems, or fsspec's for the schemes pyarrow lacks. Messages name a location through `shown` (no ?options)
and logs through `redact` (secret-looking option values hidden).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlencode

from llmrec.artifacts import atomic_write

if TYPE_CHECKING:
    import pyarrow.fs as pafs

_URI_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_SECRET_KEY_RE = re.compile(r"secret|key|token|password|credential", re.IGNORECASE)
_OBJECT_STORES = {"s3", "gcs", "abfs"}  # no directories to create before writing an object


def is_uri(location: object) -> bool:
    """True for `scheme://...` strings (s3://b/k, file:///abs, memory://x); False for local paths."""
    return isinstance(location, str) and bool(_URI_RE.match(location))


def join(base: str | os.PathLike, *parts: str) -> str:
    """`base/part/...` for a local path or a URI; a URI keeps its `?query` (e.g. endpoint options) at the end.

    Example: `join("s3://b/run?scheme=http", "data")` -> `"s3://b/run/data?scheme=http"`.
    """
    base = os.fspath(base)
    if not is_uri(base):
        return os.path.join(base, *parts)
    head, sep, query = base.partition("?")
    return "/".join([head.rstrip("/"), *(p.strip("/") for p in parts)]) + sep + query


def redact(location: str | os.PathLike) -> str:
    """The location with the values of secret-looking query options (secret_key, session_token) hidden."""
    s = os.fspath(location)
    if not is_uri(s) or "?" not in s:
        return s
    head, _, query = s.partition("?")
    pairs = [
        (k, "***" if _SECRET_KEY_RE.search(k) and k != "endpoint_override" else v)
        for k, v in parse_qsl(query)
    ]
    return head + "?" + urlencode(pairs, safe=":/")


def filesystem_for(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and the path inside it for a URI.

    pyarrow's own filesystems first (`pyarrow.fs.FileSystem.from_uri`: s3://, gs://, hdfs://, file://; S3
    options go in the query, e.g. `s3://bucket/run?endpoint_override=host:9000&scheme=http`), then fsspec for
    the schemes pyarrow lacks (memory://, az://, ...), wrapped in `pyarrow.fs.PyFileSystem`.

    Raises:
        ValueError: not a URI, bad URI options, or a scheme neither pyarrow nor an installed fsspec package
            knows (the message names the package to install).
    """
    import pyarrow as pa
    import pyarrow.fs as pafs

    if not is_uri(uri):
        raise ValueError(f"expected a URI like s3://bucket/path, got {uri!r}")
    scheme = uri.split("://", 1)[0].lower()
    try:
        return pafs.FileSystem.from_uri(uri)
    except pa.ArrowInvalid as e:
        if "Unrecognized filesystem type" not in str(e):
            raise ValueError(f"cannot open {shown(uri)}: {e}") from e
    try:
        import fsspec
    except ImportError as e:
        raise ValueError(
            f"cannot open {shown(uri)}: pyarrow has no {scheme}:// filesystem (it has s3, gs, hdfs, file); "
            f"install fsspec and its {scheme} package (`pip install fsspec`)"
        ) from e
    try:
        fs, path = fsspec.core.url_to_fs(uri)
    except ImportError as e:  # fsspec knows the scheme; its message names the package ("Install adlfs ...")
        raise ValueError(f"cannot open {shown(uri)}: {e}") from e
    except ValueError as e:  # "Protocol not known: zzz"
        raise ValueError(
            f"cannot open {shown(uri)}: neither pyarrow (s3, gs, hdfs, file) nor fsspec knows the scheme "
            f"{scheme!r}; install the fsspec implementation for it (e.g. adlfs for az://, gcsfs, s3fs)"
        ) from e
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def filesystem_and_path(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and path of a URI (`filesystem_for`) or of a local path (the local filesystem,
    the absolute path with `~` expanded): one way to list, open and write both."""
    import pyarrow.fs as pafs

    loc = os.fspath(location)
    if is_uri(loc):
        return filesystem_for(loc)
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(loc))


def read_bytes(location: str | os.PathLike) -> bytes:
    """The bytes of one file, local or at a URI. Raises FileNotFoundError when it does not exist."""
    if not is_uri(location):
        return Path(location).read_bytes()
    import pyarrow.fs as pafs

    fs, path = filesystem_for(os.fspath(location))
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise FileNotFoundError(f"{shown(location)} does not exist")
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(location: str | os.PathLike, data: bytes) -> None:
    """Write one file, local (atomically: temp file + rename) or at a URI (one PUT on object stores)."""
    if not is_uri(location):
        atomic_write(location, lambda tmp: tmp.write_bytes(data))
        return
    fs, path = filesystem_for(os.fspath(location))
    make_parent(fs, path)
    with fs.open_output_stream(path) as f:
        f.write(data)


def exists(location: str | os.PathLike) -> bool:
    """Whether a file or folder exists, local or at a URI."""
    if not is_uri(location):
        return Path(location).exists()
    import pyarrow.fs as pafs

    fs, path = filesystem_for(os.fspath(location))
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def shared_across_processes(location: str | os.PathLike | None) -> bool:
    """Whether other processes (Ray workers, other nodes) can open this URI: False for fsspec's in-process
    `memory://`, True for every other URI (s3://, gs://, hdfs://, file://, ...).

    Commands whose Ray workers read or write an artifact themselves (`llmrec embed`) take such URIs as they
    are instead of staging them through the driver's disk.
    """
    return is_uri(location) and os.fspath(location).split("://", 1)[0].lower() != "memory"


def shown(location: str | os.PathLike) -> str:
    """A location as messages and meta.json name it: a URI without its ?options (endpoint, credentials)."""
    return os.fspath(location).partition("?")[0]


def make_parent(fs: pafs.FileSystem, path: str) -> None:
    """Create the folder above `path` on filesystems that have folders (object stores have none)."""
    parent = path.rstrip("/").rsplit("/", 1)[0]
    if fs.type_name not in _OBJECT_STORES and parent and parent != path:
        fs.create_dir(parent, recursive=True)
