"""Artifact folders describe themselves with a `meta.json`; the next stage checks it before loading.

Every `meta.json` has at least `{schema_version, stage, created_at, code_version}`; stages add their own keys
(`model_name`, `dim`, ...). `check_compatible` turns a mismatch into one clear line that says what was
expected, what was found and which stage to re-run.

`atomic_write` replaces a file all at once; `write_json_report` writes a benchmark's JSON report with it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from llmrec import __version__
from llmrec.schema import META_FILE, SCHEMA_VERSION


class ArtifactError(ValueError):
    """An artifact folder is missing, of the wrong stage, or incompatible with what the caller needs."""


def load_torch_file(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """`torch.load(path, weights_only=True)`: tensors and plain containers only.

    Model files may come from a bucket or a hot-swap path; a full unpickle would run any code someone who can
    write there put in. A file that holds other objects (an older llmrec's checkpoint, or a tampered one) is
    refused, not executed.

    Raises:
        ArtifactError: the file holds objects other than tensors/dicts/lists/numbers/strings; says to retrain.
    """
    import pickle

    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ArtifactError(
            f"{path} holds Python objects other than tensors and plain containers (an older llmrec's file, "
            "or "
            "a tampered one); it is not loaded, since unpickling them could run code. Re-train it: "
            f"`llmrec train --out {Path(path).parent}` (details: {str(e).splitlines()[0][:160]})"
        ) from None


def write_meta(out_dir: str | os.PathLike, stage: str, **fields: Any) -> dict[str, Any]:
    """Write `out_dir/meta.json` atomically and return what was written."""
    meta = make_meta(stage, **fields)
    data = meta_bytes(meta)
    atomic_write(Path(out_dir) / META_FILE, lambda tmp: tmp.write_bytes(data))
    return meta


def atomic_write(
    path: str | os.PathLike, write: Callable[[Path], object], *, durable: bool = False, mode: int = 0o666
) -> None:
    """Replace the local file `path` all at once: `write(tmp)` fills a fresh temporary sibling, which is then
    renamed over `path`. A reader sees the old file or the new one, never part of one; on any error the
    temporary file is removed and `path` is left as it was.

    The temporary name is hidden (a leading dot: dataset readers such as pyarrow's skip it) and ends in the
    target's suffix, so a writer that appends one (np.save adds ".npy") writes exactly there.

    Args:
        durable: fsync the file before the rename and the directory after it (survives a power loss: for data
            that was acknowledged to someone).
        mode: permission bits of the new file (before umask), set when it is created, so a file of user data
            is never readable by others, not even while it is written.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{uuid.uuid4().hex[:8]}.tmp{p.suffix}")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode))
    try:
        write(tmp)
        if durable:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(p.parent)


def write_json_report(
    report: dict[str, Any] | list[Any], path: str | os.PathLike | None, *, indent: int = 2, echo: bool = False
) -> str:
    """Serialise a benchmark's JSON report once, write it to `path` when one is given, and return the text.

    The text is `json.dumps(report, indent=indent)` and a newline: exactly the file's content. The file is
    written with `atomic_write` (parent folders created), so a report rewritten after every measurement is
    never left half-written by an interrupted run, and a failed write leaves the previous file, or none.

    Args:
        report: a JSON-serialisable dict (or a list of rows).
        path: where to write it; None (or "") writes nothing: a script's `--out` left unset.
        echo: print the text to stdout first, so a failed write still leaves the report on screen.

    Example::

        write_json_report(report, args.out, indent=1, echo=True)  # prints it; writes it with --out
    """
    text = json.dumps(report, indent=indent) + "\n"
    if echo:
        print(text, end="")
    if path:
        data = text.encode()
        atomic_write(path, lambda tmp: tmp.write_bytes(data))
    return text


def fsync_dir(d: str | os.PathLike) -> None:
    """Make the directory's entries (a new or renamed file) durable."""
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_meta(stage: str, **fields: Any) -> dict[str, Any]:
    """The meta dict `write_meta` writes (for writers that put meta.json elsewhere, e.g. at a URI)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "stage": stage,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "code_version": __version__,
        **fields,
    }


def meta_bytes(meta: Mapping[str, Any]) -> bytes:
    """meta.json's bytes for a meta dict (sorted keys, indented, numpy values as lists)."""
    return (json.dumps(meta, indent=2, sort_keys=True, default=_json_default) + "\n").encode()


def read_meta(art_dir: str | os.PathLike, stage: str | None = None) -> dict[str, Any]:
    """Read `art_dir/meta.json`; with `stage`, refuse an artifact of another stage."""
    path = Path(art_dir) / META_FILE
    if not path.is_file():
        hint = f"; run `llmrec {stage}` to create it" if stage else ""
        raise ArtifactError(f"{art_dir} is not an llmrec artifact: {path} does not exist{hint}")
    meta = json.loads(path.read_text())
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise ArtifactError(
            f"{path}: schema_version {meta.get('schema_version')!r}, this llmrec reads {SCHEMA_VERSION}; "
            f"re-run the stage that wrote it ({meta.get('stage')!r})"
        )
    if stage is not None and meta.get("stage") != stage:
        raise ArtifactError(
            f"{art_dir} holds a {meta.get('stage')!r} artifact, expected a {stage!r} artifact; "
            f"pass the folder written by `llmrec {stage}`"
        )
    return meta


def check_compatible(
    found: Mapping[str, Any],
    expected: Mapping[str, Any],
    keys: Iterable[str],
    *,
    found_name: str,
    expected_name: str,
    rerun: str,
) -> None:
    """Raise ArtifactError naming every key whose value differs between two metas.

    Example::

        check_compatible(index_meta["embed"], embed_meta, ["model_name", "dim"],
                         found_name="index", expected_name="embeddings", rerun="llmrec index")
    """
    diffs = [
        f"{k}: {expected_name} has {expected.get(k)!r}, {found_name} has {found.get(k)!r}"
        for k in keys
        if found.get(k) != expected.get(k)
    ]
    if diffs:
        raise ArtifactError(
            f"{found_name} does not match {expected_name} (" + "; ".join(diffs) + f"); re-run `{rerun}`"
        )


def file_fingerprint(paths: Iterable[str | os.PathLike], chunk_bytes: int = 1 << 20) -> str:
    """sha256 (first 16 hex digits) over the bytes of the given files, in order."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while chunk := f.read(chunk_bytes):
                h.update(chunk)
    return h.hexdigest()[:16]


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
