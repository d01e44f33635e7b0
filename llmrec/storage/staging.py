"""Staging: artifact folders moved between a URI and local disk, through a local cache.

Every stage reads and writes plain local folders, so each command runs unchanged on local paths: `llmrec.cli`
wraps every command in `localize`, driven by the command module's `storage_args(args)` declaration
(`llmrec.storage.flags`) of which flags are inputs and which are outputs.

- `stage_in(uri, cache_root)` downloads an artifact folder (or one file) into a local cache keyed by the
  URI, and reuses the cached copy while the remote `meta.json` is unchanged (files: size and mtime).
- `stage_out(uri, cache_root)` yields an empty local staging folder. When the block ends without an exception,
  its files are uploaded with `meta.json` last, so a reader never takes a half-written artifact for a
  complete one; after an exception nothing is uploaded and the previous remote version stays as it was.
  The uploaded folder then becomes the cache entry of `uri`, so the next stage reads it without a download.

Overwrite semantics (`stage_out`, the default `Out("replace")`): an artifact folder is replaced as a whole.
The writer first puts a `.llmrec-incomplete` mark into the remote folder, deletes its `meta.json` and then
every other file of the previous version, uploads the new files, `meta.json` last, and removes the mark.
A folder that holds files but neither a `meta.json` nor that mark is not an llmrec artifact: it is never
overwritten (so `--out s3://bucket` cannot wipe a bucket). `Out("add")` into a folder that did not exist yet
(e.g. `llmrec replay` writing RUN/eval/replay.json before `llmrec evaluate` ran) leaves a `.llmrec-added` mark
there, so the stage that owns the folder may still replace it later. Two writers of the same URI at once are
not coordinated; the last `meta.json` wins and may describe a mix, as with two processes writing one local
folder.

Example::

    with stage_out("s3://bucket/run/embeddings", cache) as local:
        embed_catalog(stage_in("s3://bucket/run/data", cache), local)
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from llmrec.artifacts import ArtifactError
from llmrec.schema import META_FILE
from llmrec.storage.flags import Arg, In, LocalOnly, Out, OutFile, Run
from llmrec.storage.uri import filesystem_for, is_uri, join, make_parent, redact, shown

if TYPE_CHECKING:
    import pyarrow.fs as pafs

logger = logging.getLogger(__name__)

CACHE_ENV = "LLMREC_CACHE_DIR"  # overrides DEFAULT_CACHE (read by entry points, never by the library)
DEFAULT_CACHE = Path("~/.cache/llmrec/artifacts")
INCOMPLETE_MARK = ".llmrec-incomplete"  # present while a writer replaces a remote artifact folder
ADDED_MARK = ".llmrec-added"  # an "add" created this folder: llmrec's own, replaceable without a meta.json
_MARKS = (INCOMPLETE_MARK, ADDED_MARK)
_CACHE_INFO = ".llmrec-cache.json"  # per cache entry: the (redacted) URI and the version it holds
_THREADS = 8  # parallel file transfers


def check_replaceable(uri: str) -> None:
    """Refuse (ValueError) to write an artifact at `uri` when it is a file, or a folder that holds files but
    is neither an llmrec artifact (meta.json) nor marked as one being written (the rule of `stage_out`)."""
    fs, path = filesystem_for(uri)
    _check_replaceable(fs, path, uri)


def default_cache_root(environ: Mapping[str, str]) -> Path:
    """`$LLMREC_CACHE_DIR` if set in `environ`, else `~/.cache/llmrec/artifacts`."""
    return Path(environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


# ------------------------------------------------------------------------------------------------ stage in


def stage_in(
    uri: str,
    cache_root: str | os.PathLike,
    *,
    stage: str | None = None,
    need_meta: bool = True,
    by_listing: bool = False,
) -> Path:
    """Download the artifact folder (or file) at `uri` into `cache_root`; return its local path.

    The copy is reused while the remote `meta.json` has the same bytes (a file: the same size and mtime; a
    folder without meta.json (`need_meta=False`) or any folder with `by_listing`: the same file names, sizes
    and mtimes), and downloaded again otherwise. The local path keeps the remote base name (`.../embeddings`,
    `.../items.parquet`).

    Args:
        uri: the remote folder or file.
        cache_root: local cache folder (see `default_cache_root`).
        stage: the command that writes this artifact, named in the missing-meta.json error.
        need_meta: refuse a folder without meta.json (an incomplete or foreign folder) with ArtifactError.
        by_listing: version the folder by its file listing even when it has a meta.json: for folders that grow
            while their meta.json stays the same (the serving event log, RUN/events).

    Raises:
        FileNotFoundError: nothing at `uri`.
        ArtifactError: a folder without meta.json (with `need_meta`).
        OSError: the remote artifact kept changing while it was downloaded (a writer is replacing it).
    """
    import pyarrow.fs as pafs

    fs, path = filesystem_for(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        hint = f"; run `llmrec {stage}` to create it" if stage else ""
        raise FileNotFoundError(f"{shown(uri)} does not exist{hint}")
    entry = _CacheEntry(Path(cache_root), uri, _basename(path))
    with entry.locked():
        for _attempt in range(3):
            meta = None
            if info.type == pafs.FileType.File:
                version = f"file:{info.size}:{info.mtime_ns}" if info.mtime_ns is not None else None
            else:
                meta = _read_optional(fs, f"{path}/{META_FILE}")
                if meta is not None and not by_listing:
                    version = "meta:" + hashlib.sha256(meta).hexdigest()
                elif meta is None and need_meta:
                    hint = f"; run `llmrec {stage}` to create it" if stage else ""
                    raise ArtifactError(
                        f"{shown(uri)} is not an llmrec artifact: {shown(uri)}/{META_FILE} does not "
                        f"exist (missing, or an upload that did not finish){hint}"
                    )
                else:
                    version = _listing_version(fs, path)
            if version is not None and entry.version() == version and entry.path.exists():
                logger.debug("cache hit for %s: %s", redact(uri), entry.path)
                return entry.path
            t0 = time.perf_counter()
            tmp = entry.new_tmp()
            try:
                if info.type == pafs.FileType.File:
                    _get_file(fs, path, tmp)
                    n_files, n_bytes = 1, tmp.stat().st_size
                else:
                    n_files, n_bytes = _get_folder(fs, path, tmp, meta)
                # a writer that replaced the artifact meanwhile deleted meta.json first: compare it again
                if version is not None and version.startswith("list:"):
                    unchanged = _listing_version(fs, path) == version
                else:
                    unchanged = meta is None or _read_optional(fs, f"{path}/{META_FILE}") == meta
                if unchanged:
                    entry.install(tmp, version)
                    logger.info(
                        "staged in %s -> %s (%d files, %.1f MB, %.1fs)",
                        redact(uri),
                        entry.path,
                        n_files,
                        n_bytes / 1e6,
                        time.perf_counter() - t0,
                    )
                    return entry.path
            finally:
                shutil.rmtree(tmp.parent, ignore_errors=True)
            logger.warning("%s changed while it was downloaded; downloading it again", redact(uri))
            info = fs.get_file_info(path)
    raise OSError(
        f"{shown(uri)} kept changing while it was downloaded (is a writer replacing it?); retry later"
    )


def stage_in_run(uri: str, cache_root: str | os.PathLike, parts: tuple[str, ...]) -> Path:
    """A local run folder whose `parts` (e.g. "embeddings", "scorer") link to staged-in copies of `uri/part`.

    Parts that do not exist remotely are left out (commands decide which parts they need and say so).
    """
    run = Path(cache_root) / "runs" / _key(uri)
    run.mkdir(parents=True, exist_ok=True)
    for part in parts:
        link = run / part
        try:
            target = stage_in(join(uri, part), cache_root)
        except FileNotFoundError:
            logger.debug("run %s has no %s", redact(uri), part)
            target = None
        except ArtifactError as e:
            logger.warning("leaving out %s: %s", part, e)
            target = None
        if target is None:
            link.unlink(missing_ok=True)
            continue
        # a new link under a unique name renamed over the old one: processes staging the same run at once
        # (batch rankers on one node) never see the link missing or fail to create it
        tmp = run / f".{part}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        tmp.symlink_to(target, target_is_directory=target.is_dir())
        os.replace(tmp, link)
    return run


# ------------------------------------------------------------------------------------------------ stage out


@contextlib.contextmanager
def stage_out(
    uri: str,
    cache_root: str | os.PathLike,
    mode: Literal["replace", "update", "add"] = "replace",
) -> Iterator[Path]:
    """Yield a local folder; upload it to `uri` when the block ends without an exception (see module doc).

    Modes: "replace" (start empty; replace the remote folder as a whole), "update" (start from a copy of
    the remote artifact, e.g. to add items to an index; then replace), "add" (start empty; upload the new
    files next to the remote ones, deleting nothing).

    Raises:
        ValueError: a bad URI, or (replace/update) a remote folder that holds files but is not an artifact.
    """
    fs, path = filesystem_for(uri)  # a bad scheme fails here, before the command does any work
    if mode not in ("replace", "update", "add"):
        raise ValueError(f"mode must be 'replace', 'update' or 'add', got {mode!r}")
    if mode != "add":
        _check_replaceable(fs, path, uri)
    import pyarrow.fs as pafs

    new_folder = mode == "add" and fs.get_file_info(path).type == pafs.FileType.NotFound
    root = Path(cache_root)
    (root / "staging").mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="out-", dir=root / "staging"))
    local = staging / _basename(path)
    try:
        if mode == "update" and _read_optional(fs, f"{path}/{META_FILE}") is not None:
            shutil.copytree(stage_in(uri, root), local, symlinks=True)
        else:
            local.mkdir()
        yield local
        t0 = time.perf_counter()
        n_files, n_bytes = _upload(local, fs, path, uri, replace=mode != "add")
        if new_folder and not (local / META_FILE).is_file():
            _put_bytes(fs, f"{path}/{ADDED_MARK}", b"")  # ours, though not (yet) an artifact: see module doc
        logger.info(
            "uploaded %s -> %s (%d files, %.1f MB, meta.json last, %.1fs)",
            local,
            redact(uri),
            n_files,
            n_bytes / 1e6,
            time.perf_counter() - t0,
        )
        entry = _CacheEntry(root, uri, local.name)
        with entry.locked():
            meta = local / META_FILE
            if mode != "add" and meta.is_file():  # the uploaded folder is what the cache would download
                entry.install(local, "meta:" + hashlib.sha256(meta.read_bytes()).hexdigest())
            else:
                entry.drop()
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def stage_out_file(uri: str, cache_root: str | os.PathLike) -> Iterator[Path]:
    """Yield a local file path; upload that file to `uri` when the block ends without an exception."""
    fs, path = filesystem_for(uri)
    (Path(cache_root) / "staging").mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="out-", dir=Path(cache_root) / "staging"))
    try:
        local = staging / _basename(path)
        yield local
        if not local.is_file():
            raise FileNotFoundError(f"the command wrote no file to upload to {shown(uri)} (expected {local})")
        _put_file(fs, local, path)
        logger.info("uploaded %s -> %s (%.1f MB)", local, redact(uri), local.stat().st_size / 1e6)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def localize(
    values: Mapping[str, Any], spec: Mapping[str, Arg], cache_root: str | os.PathLike
) -> Iterator[dict[str, Any]]:
    """A copy of `values` (parsed flags) with every URI named in `spec` replaced by a local path.

    Inputs are staged in before the block; outputs are uploaded when it ends without an exception (the
    caller raises to skip the upload, e.g. for a failed command). Local paths and unset flags pass through.

    Example::

        with localize(vars(args), {"items": In("prepare"), "out": Out()}, cache) as local:
            run(argparse.Namespace(**local))
    """
    out = dict(values)
    with contextlib.ExitStack() as stack:
        for name, arg in spec.items():
            value = values.get(name)
            if not is_uri(value):
                continue
            flag = "--" + name.replace("_", "-")
            if isinstance(arg, LocalOnly):
                raise ValueError(f"{flag} {shown(value)}: must be a local folder: {arg.why}")
            if isinstance(arg, In):
                out[name] = str(
                    stage_in(
                        value,
                        cache_root,
                        stage=arg.stage,
                        need_meta=arg.stage is not None,
                        by_listing=arg.by_listing,
                    )
                )
            elif isinstance(arg, Run):
                out[name] = str(stage_in_run(value, cache_root, arg.parts))
            elif isinstance(arg, Out):
                out[name] = str(stack.enter_context(stage_out(value, cache_root, arg.mode)))
            elif isinstance(arg, OutFile):
                out[name] = str(stack.enter_context(stage_out_file(value, cache_root)))
            else:
                raise TypeError(f"{name}: unknown storage declaration {arg!r}")
        try:
            yield out
        except (ValueError, FileNotFoundError) as e:  # user errors: name the URI, not the local copy
            msg = str(e)
            for name in spec:
                if is_uri(values.get(name)) and out[name] in msg:
                    msg = msg.replace(out[name], shown(values[name]))
            if msg == str(e) or len(e.args) != 1:
                raise
            raise type(e)(msg) from e


# ------------------------------------------------------------------------------------------------ internals


class _CacheEntry:
    """`cache_root/<sha256(uri)[:16]>/<basename>` plus a small json saying which version it holds."""

    def __init__(self, cache_root: Path, uri: str, name: str) -> None:
        self.dir = cache_root / _key(uri)
        self.path = self.dir / name
        self.uri = uri

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir.with_suffix(".lock"), "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # one process at a time fills or replaces this entry
            yield

    def version(self) -> str | None:
        try:
            return json.loads((self.dir / _CACHE_INFO).read_text()).get("version")
        except (OSError, ValueError):
            return None

    def new_tmp(self) -> Path:
        return Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.dir)) / self.path.name

    def install(self, src: Path, version: str | None) -> None:
        """Move the folder or file `src` (a finished download or upload) into place as `version`."""
        self.drop()
        shutil.move(src, self.path)
        info = {"uri": redact(self.uri), "version": version}
        (self.dir / _CACHE_INFO).write_text(json.dumps(info) + "\n")

    def drop(self) -> None:
        (self.dir / _CACHE_INFO).unlink(missing_ok=True)
        if self.path.is_dir() and not self.path.is_symlink():
            shutil.rmtree(self.path)
        elif self.path.exists() or self.path.is_symlink():
            self.path.unlink()


def _key(uri: str) -> str:
    return hashlib.sha256(uri.encode()).hexdigest()[:16]


def _basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1] or "root"


def _read_optional(fs: pafs.FileSystem, path: str) -> bytes | None:
    import pyarrow.fs as pafs

    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return f.read()


def _list_files(fs: pafs.FileSystem, path: str) -> list[tuple[str, Any]]:
    """(path relative to `path`, FileInfo) of every file below `path`, sorted."""
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    base = path.rstrip("/") + "/"
    return sorted(
        (i.path[len(base) :], i) for i in infos if i.type == pafs.FileType.File and i.path.startswith(base)
    )


def _listing_version(fs: pafs.FileSystem, path: str) -> str | None:
    """A version for a folder without meta.json: names, sizes, mtimes; None when an mtime is unknown."""
    rows = []
    for rel, info in _list_files(fs, path):
        if info.mtime_ns is None:
            return None
        rows.append(f"{rel}\t{info.size}\t{info.mtime_ns}")
    return "list:" + hashlib.sha256("\n".join(rows).encode()).hexdigest()


def _get_file(fs: pafs.FileSystem, remote: str, local: Path) -> None:
    local.parent.mkdir(parents=True, exist_ok=True)
    with fs.open_input_stream(remote) as src, open(local, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)


def _get_folder(fs: pafs.FileSystem, path: str, local: Path, meta: bytes | None) -> tuple[int, int]:
    """Download every file below `path` except the marks; meta.json is written from the bytes read before."""
    files = [(rel, i) for rel, i in _list_files(fs, path) if rel not in (META_FILE, *_MARKS)]
    for rel, _i in files:
        _inside(local, rel, path)
    local.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(_THREADS) as pool:
        list(pool.map(lambda f: _get_file(fs, f[1].path, local / f[0]), files))
    if meta is not None:
        (local / META_FILE).write_bytes(meta)
    return len(files) + (meta is not None), sum(i.size or 0 for _, i in files) + len(meta or b"")


def _inside(local: Path, rel: str, remote: str) -> Path:
    """`local / rel`, refusing a remote key that would land outside `local` (`../`, absolute, empty parts):
    whoever can write the bucket must not be able to write anywhere on this machine."""
    parts = rel.split("/")
    if not rel or rel.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in rel:
        raise ValueError(f"remote key {rel!r} under {shown(remote)} is not a plain relative path (it has "
                         "'..', "
                         "'.', an empty part or a leading '/'); refusing to download it outside the cache "
                         "folder: remove or rename it in the bucket")
    dest = (local / rel).resolve()
    if not dest.is_relative_to(local.resolve()):
        raise ValueError(f"remote key {rel!r} under {shown(remote)} resolves outside the cache folder")
    return dest


def _put_file(fs: pafs.FileSystem, local: Path, remote: str) -> None:
    make_parent(fs, remote)
    with open(local, "rb") as src, fs.open_output_stream(remote) as dst:
        shutil.copyfileobj(src, dst, 1 << 20)


def _check_replaceable(fs: pafs.FileSystem, path: str, uri: str) -> None:
    import pyarrow.fs as pafs

    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return
    if info.type == pafs.FileType.File:
        raise ValueError(f"{shown(uri)} is a file; an artifact folder is needed there")
    names = [i.base_name for i in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))]
    if names and META_FILE not in names and not set(_MARKS) & set(names):
        raise ValueError(
            f"refusing to overwrite {shown(uri)}: it holds {len(names)} entries (e.g. {sorted(names)[:3]}) "
            f"but no {META_FILE}, so it is not an llmrec artifact; point the output at an empty or new folder"
        )


def _upload(local: Path, fs: pafs.FileSystem, path: str, uri: str, *, replace: bool) -> tuple[int, int]:
    """Upload every file below `local` to `path`, meta.json last; `replace`: drop the old version first."""
    files = sorted(p for p in local.rglob("*") if p.is_file() and p.name not in _MARKS)
    meta = local / META_FILE
    data = [p for p in files if p != meta]
    mark = f"{path}/{INCOMPLETE_MARK}"
    if replace:
        import pyarrow.fs as pafs

        _check_replaceable(fs, path, uri)
        _put_bytes(fs, mark, b"")  # from here until meta.json arrives, the folder is visibly incomplete
        if fs.get_file_info(f"{path}/{META_FILE}").type == pafs.FileType.File:
            fs.delete_file(f"{path}/{META_FILE}")
        fs.delete_dir_contents(path, missing_dir_ok=True)  # the mark too: put it back
        _put_bytes(fs, mark, b"")
    with ThreadPoolExecutor(_THREADS) as pool:
        list(pool.map(lambda p: _put_file(fs, p, f"{path}/{p.relative_to(local).as_posix()}"), data))
    if meta.is_file():
        _put_file(fs, meta, f"{path}/{META_FILE}")
    if replace:
        fs.delete_file(mark)
    return len(files), sum(p.stat().st_size for p in files)


def _put_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    make_parent(fs, path)
    with fs.open_output_stream(path) as f:
        f.write(data)
