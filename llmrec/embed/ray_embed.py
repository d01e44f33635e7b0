"""Embed a whole item catalog with Ray Data, storage to storage: `embed_catalog(items, out_dir, cfg) -> meta`.

The options (batch size, token limit, actors, device, ...) are the fields of `llmrec.config.EmbedConfig`.

Pipeline (one streaming Ray Data plan; the driver holds counts, never per-item data):

    check tasks (one per input file)               # nulls, empty / duplicate ids (hash-partitioned), sha256
    read_parquet(files, columns=[item_id, text])   # a local path or a URI (s3://, ...), one file or shards
      -> repartition(target_num_rows_per_block=R)  # streaming: one file is one block (PLATFORM.md G4)
      -> map_batches(_tokenize_block) CPU tasks     # int32 ids (R, w), w = the block's longest row
      -> map_batches(_EncodeBatch) actor pool       # sort the block by length, encode batch_size rows at a
                                                    #   time, each batch trimmed; rows back in order
      -> write_parquet(out, part-<write id>-NNNNNN.parquet)   # from the workers, one file per block
    meta.json last, by the driver (counts from the parquet footers and a small stats actor)

Choices:
- Row order: the execution preserves order (`preserve_order`), so the parts in name order hold the items in
  input order (input files in name order, rows in file order): the order `load_embeddings` returns.
- Length bucketing happens inside each block of R rows (no global sort, no shuffle): R = clamp(N / max actors,
  8 x batch_size, 8192). `padding_efficiency` in meta = real / padded tokens over all encoder batches;
  on the 9,742 MovieLens texts at batch 128: 0.33 unsorted, 0.68 / 0.79 / 0.88 / 0.92 sorted within blocks of
  1,024 / 2,048 / 4,096 / 8,192 rows, 0.97 sorted globally (the former `bucketing="dataset"`, which needed
  a global sort; "dataset" is still accepted and now means the same as "group", with a warning).
- Actors (`plan_actors`, a pure function of the cluster's resources): GPU actors request `num_gpus=1`, fp16,
  one per GPU. `--num-gpus N` / `--device cuda` request them even when no GPU node is up yet, so an autoscaler
  starts GPU nodes; `auto` chooses GPUs when the cluster has some or its autoscaler reports a GPU node type
  (`llmrec.raysetup.cluster_max_gpus`), and logs which and why (meta `device_reason`). CPU actors: 1 torch
  thread each and `num_cpus=0.5`, together at most `CPUs - 1`, which leaves a CPU for the read / tokenize /
  write tasks (the actor-pool deadlock of PLATFORM.md G3); default pool size min(CPUs, 2 x (CPUs - 1)).
- Output: a new version is written next to the old one under a fresh write id; meta.json (which names the
  write id) replaces the old one in one step, then the old files are deleted. A failed run leaves the
  previous version readable and deletes its own parts. A URI output is checked like `llmrec.storage` does
  (never over a folder that holds files but is not an artifact).
- Local input / output paths: the tasks that read or write them run on the driver's node (node affinity),
  so a local disk works on a multi-node cluster too; a URI is read and written from any node.
- `dataset_fingerprint` is the prepare stage's fingerprint when the input is a `llmrec prepare` folder's
  items.parquet, else `items_sha256`: the sha256 prefix of the items file (several files: of their names and
  digests).
- Timing in meta: `wall_s` covers validation, actor start-up and model loads, the pipeline and the write
  (not `ray.init`); `first_batch_s` is pipeline start to the first encoded block (the fixed cost).
Tests: tests/test_ray_embed.py.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from llmrec import storage
from llmrec.artifacts import make_meta, meta_bytes, write_meta
from llmrec.config import EmbedConfig, with_overrides
from llmrec.embed.encoder import TextEncoder, TextTokenizer, attention_mask_from_length, resolve_model
from llmrec.embed.source import check_items, open_input, pinned, prepare_fingerprint, resolve_items
from llmrec.schema import (
    EMBEDDING,
    EMBEDDINGS_FILE,
    EMBEDDINGS_PART_PREFIX,
    ITEM_ID,
    META_FILE,
    TEXT,
)

logger = logging.getLogger(__name__)

__all__ = ["embed_catalog", "resolve_items_file", "plan_actors"]

_LENGTH = "length"
_IDS = "input_ids"
CPU_ACTOR_CPUS = 0.5
MAX_ROWS_PER_BLOCK = 8192  # bucketing sorts within a block: bigger pads less (module doc); 4 MB of int32 ids
MIN_BLOCK_BATCHES = 8  # at least 8 encoder batches per block, so sorting inside it has room to bucket
NODE_ID_LABEL = "ray.io/node-id"  # the label Ray gives every node (what Ray Data pins local reads with)


def embed_catalog(
    items: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: EmbedConfig | None = None,
    *,
    ray_address: str | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Embed every item's `text`; write `out_dir/part-*.parquet` from the workers, then `meta.json`.

    Args:
        items: the items table: a parquet file, a folder of parquet shards, or a `llmrec prepare` folder (its
            items.parquet); a local path or a URI (s3://, gs://, file://, ...) every Ray node can read. Needs
            columns `item_id` (string, unique, non-empty) and `text` (string, non-null).
        out_dir: artifact folder to write, local or a URI (created if missing; the previous version is
            replaced once the new one is complete).
        config: the options (model, batch_size, max_length, num_actors, device, num_gpus, bucketing,
            rows_per_block; documented in `llmrec.config.EmbedConfig`); None = `EmbedConfig()`.
        ray_address: Ray cluster to join; None = the running Ray, $RAY_ADDRESS, or a new local one.
        **options: EmbedConfig fields that replace those of `config`, for keyword callers
            (`embed_catalog(items, out, batch_size=16)`); `model` may be a path.

    Returns:
        The meta dict written to `out_dir/meta.json` (stage "embed").

    Raises:
        ValueError: missing columns, null/empty/duplicate ids, null texts, an empty catalog, an unknown or
            out-of-range option, a GPU request the cluster can never meet.
        FileNotFoundError: `items` does not exist.

    Example::

        meta = embed_catalog("run/data", "run/embeddings")   # all-MiniLM-L6-v2, 384-d
        meta = embed_catalog("run/data", "run/embeddings", EmbedConfig(batch_size=256, device="cpu"))
        print(meta["n_items"], meta["items_per_s"])
    """
    import ray

    from llmrec.raysetup import cluster_cpus, cluster_gpus, cluster_max_gpus, cluster_node_cpus, init_ray

    if isinstance(options.get("model"), os.PathLike):
        options["model"] = os.fspath(options["model"])
    cfg = with_overrides(config if config is not None else EmbedConfig(), options, "embed_catalog")
    batch_size, max_length, device = cfg.batch_size, cfg.max_length, cfg.device
    bucketing = cfg.bucketing
    if bucketing == "dataset":
        logger.warning(
            "bucketing 'dataset' (a global sort by length) is gone: it needed the whole catalog in one "
            "place; sorting within blocks of up to %d rows instead (bucketing 'group')",
            MAX_ROWS_PER_BLOCK,
        )
        bucketing = "group"

    t_start = time.perf_counter()
    src = resolve_items(items)  # footers only: schema, row counts
    n = src.n_rows
    model_path, model_name = resolve_model(cfg.model)
    dim = _model_dim(model_path)
    out = _Output(out_dir)

    t_ray = time.perf_counter()
    init_ray(ray_address)
    ray_init_s = time.perf_counter() - t_ray  # not part of wall_s (a no-op when Ray is already up)
    max_gpus, gpu_types = cluster_max_gpus()
    plan = plan_actors(
        cluster_cpus(),
        cluster_gpus(),
        device=device,
        num_actors=cfg.num_actors,
        num_gpus=cfg.num_gpus,
        max_gpus=max_gpus,
        gpu_node_types=gpu_types,
        node_cpus=cluster_node_cpus(),
    )
    rows = cfg.rows_per_block or _rows_per_block(n, plan["max_actors"], batch_size)
    n_blocks = math.ceil(n / rows)
    if plan["max_actors"] > n_blocks:  # an actor per block at most: each more one only loads the model
        plan["max_actors"] = plan["num_actors"] = n_blocks
        plan["min_actors"] = min(plan["min_actors"], n_blocks)
        plan["reason"] += f"; {n_blocks} block(s) of items, so at most {n_blocks} actor(s)"
    logger.info(
        "embedding %d items from %s (%d file(s)) with %s: %s encoder actor(s) (num_cpus=%.2f, num_gpus=%d), "
        "%d blocks of <= %d rows, batch %d. Device %s: %s",
        n,
        src.location,
        len(src.files),
        model_name,
        _pool_size(plan),
        plan["num_cpus"],
        plan["num_gpus"],
        n_blocks,
        rows,
        batch_size,
        plan["device"],
        plan["reason"],
    )
    driver_node = ray.get_runtime_context().get_node_id()
    checked = check_items(src, driver_node)  # raises ValueError on bad rows, before any actor starts

    out.create()
    stats = ray.remote(num_cpus=0)(_EmbedStats).remote()
    prefix = f"{EMBEDDINGS_PART_PREFIX}{uuid.uuid4().hex[:8]}-"
    t_pipe = time.time()
    try:
        ds = ray.data.read_parquet(
            list(src.files),
            filesystem=src.fs,
            label_selector={NODE_ID_LABEL: driver_node} if src.fs is None else None,
        ).select_columns([ITEM_ID, TEXT])
        ds.context.execution_options.preserve_order = True  # parts in name order = items order
        ds = ds.repartition(target_num_rows_per_block=rows)
        ds = ds.map_batches(
            _tokenize_block,
            batch_size=None,  # one block per task
            batch_format="numpy",
            fn_kwargs={"model_path": model_path, "max_length": max_length},
        )
        ds = ds.map_batches(
            _EncodeBatch,
            batch_size=None,  # one block per call: bucketing sorts within it
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(min_size=plan["min_actors"], max_size=plan["max_actors"]),
            fn_constructor_kwargs={
                "model_path": model_path,
                "max_length": max_length,
                "batch_size": batch_size,
                "device": plan["device"],
                "fp16": plan["fp16"],
                "num_threads": plan["torch_threads"],
                "stats": stats,
            },
            num_cpus=plan["num_cpus"],
            num_gpus=plan["num_gpus"],
        )
        with _Progress(stats, n, t_pipe):
            ds.write_parquet(
                out.path,
                filesystem=out.fs,
                filename_provider=_PartNames(prefix),
                ray_remote_args=pinned(driver_node) if out.fs is None else None,
            )
        totals = ray.get(stats.totals.remote())
        parts, written = out.parts(prefix)
        if written != n or totals["rows"] != n:
            raise RuntimeError(
                f"embed pipeline wrote {written} rows in {len(parts)} part files (encoded {totals['rows']}) "
                f"for {n} items; this is a bug, please report it"
            )
    except BaseException:
        out.delete_parts(prefix)  # the previous version (if any) stays as it was
        raise
    finally:
        ray.kill(stats)

    wall_s = time.perf_counter() - t_start - ray_init_s
    first_batch_s = max(0.0, (totals["first_ts"] or t_pipe) - t_pipe)
    fields = dict(
        model_name=model_name,
        model_path=model_path,
        dim=dim,
        normalized=True,
        max_length=max_length,
        pooling="mean",
        n_items=n,
        dataset_fingerprint=prepare_fingerprint(src) or checked["sha256"],
        items_sha256=checked["sha256"],
        items_file=src.location,
        n_input_files=len(src.files),
        wall_s=round(wall_s, 3),
        items_per_s=round(n / wall_s, 2),
        first_batch_s=round(first_batch_s, 3),
        batch_size=batch_size,
        num_actors=plan["num_actors"],
        min_actors=plan["min_actors"],
        max_actors=plan["max_actors"],
        device=plan["device"],
        device_reason=plan["reason"],
        fp16=plan["fp16"],
        n_blocks=n_blocks,
        rows_per_actor_call=rows,
        bucketing=bucketing,
        padding_efficiency=round(totals["tokens"] / max(totals["padded"], 1), 4),
        layout="parts",
        parts_prefix=prefix,
        n_parts=len(parts),
    )
    meta = out.commit(fields, prefix)
    logger.info(
        "embedded %d items in %.1fs (%.0f items/s, padding efficiency %.2f) -> %s (%d part files)",
        n,
        wall_s,
        n / wall_s,
        meta["padding_efficiency"],
        out.location,
        len(parts),
    )
    return meta


def plan_actors(
    cpus: float,
    gpus: float,
    device: str = "auto",
    num_actors: int | None = None,
    *,
    num_gpus: int | None = None,
    max_gpus: float | None = None,
    gpu_node_types: tuple[str, ...] = (),
    node_cpus: tuple[float, ...] | None = None,
) -> dict[str, Any]:
    """Decide the encoder actor pool from the cluster's resources: a pure function (no Ray calls).

    Args:
        cpus, gpus: CPUs and GPUs the cluster has now.
        device: "auto", "cpu" or "cuda".
        num_actors: pool size asked for (GPU actors: one GPU each).
        num_gpus: GPU actors requested (1 GPU each): made even when no GPU is up yet.
        max_gpus: GPUs the cluster's autoscaler can scale to (inf = no limit); None = no autoscaler config.
        gpu_node_types: the autoscaler's GPU node types, named in `reason`.
        node_cpus: CPUs of each node (None = one node). CPU actors leave a whole CPU free on some node for
            the read/tokenize tasks wherever Ray places them: together they take at most sum(C_i - 1) CPUs
            (if every node had < 1 CPU free, the actors would hold more than that). On one node: CPUs - 1.

    Returns:
        {"num_actors", "min_actors", "max_actors" (pool size: fixed when equal, else Ray Data scales it),
        "num_cpus" and "num_gpus" (per actor: the resources each actor requests), "device", "fp16",
        "torch_threads", "reason" (why this device, for the log and meta)}

    Raises:
        ValueError: a GPU request the cluster can never meet, or contradicting arguments.
    """
    if num_gpus is not None:
        if not isinstance(num_gpus, int) or num_gpus < 1:
            raise ValueError(f"num_gpus must be a positive int or None, got {num_gpus!r}")
        if device == "cpu":
            raise ValueError(f"num_gpus={num_gpus} asks for GPU actors but device is 'cpu'; drop one of them")
        if num_actors is not None and num_actors != num_gpus:
            raise ValueError(
                f"num_actors={num_actors} and num_gpus={num_gpus} disagree: GPU actors take one GPU each; "
                "pass only --num-gpus"
            )
    have = f"{cpus:g} CPU, {gpus:g} GPU"
    scalable = "" if not gpu_node_types else f" (autoscaler GPU node types: {'; '.join(gpu_node_types)})"
    can_have = gpus if max_gpus is None else max(gpus, max_gpus)
    gpu_actors = device != "cpu" and bool(num_gpus or device.startswith("cuda") or can_have >= 1)
    want = num_gpus or (num_actors if gpu_actors else None)  # an explicit GPU pool size

    if gpu_actors:
        if want is not None and want > can_have and not (num_gpus and max_gpus is None):
            limit = f"the cluster has {gpus:g}" + (
                "" if max_gpus is None else f" and can scale to {max_gpus:g}"
            )
            raise ValueError(
                f"num_actors={want} GPU actors need {want} GPUs, {limit}{scalable}; "
                f"pass at most {int(can_have)}"
            )
        if can_have < 1 and not num_gpus:
            why = "reports no GPU node type" if max_gpus is not None else "reports no node types (none runs?)"
            raise ValueError(
                f"device {device!r} asked for, but the Ray cluster has no GPU (resources: {have}) and its "
                f"autoscaler {why}; use --device cpu or auto, or --num-gpus N to request N GPUs anyway"
            )
        if want is not None:
            lo = hi = want
            if num_gpus and want > gpus:
                reason = f"{want} GPU actor(s) requested (--num-gpus); the cluster has {have} now" + (
                    f", so the autoscaler must add {want - gpus:g}{scalable}"
                    if max_gpus is not None
                    else "; no autoscaler reports node types, so they wait until GPU nodes join"
                )
            else:
                reason = f"{want} GPU actor(s) asked for; the cluster has {have}"
        elif gpus >= 1:
            lo = hi = int(gpus)
            reason = f"the cluster has {have}: one actor per GPU"
        else:  # nothing up yet: start with one GPU actor and let Ray Data scale the pool up to what can come
            lo, hi = 1, int(min(can_have, 1024))
            reason = (
                f"no GPU is up ({have}) but the autoscaler can start GPU nodes{scalable}: requesting 1 to "
                f"{hi} GPU actors so it brings them up"
            )
        return {
            "num_actors": hi,
            "min_actors": lo,
            "max_actors": hi,
            "num_cpus": 1.0,
            "num_gpus": 1,
            "device": "cuda",
            "fp16": True,
            "torch_threads": None,
            "reason": reason,
        }

    if device == "cpu":
        reason = "device 'cpu' asked for"
    elif max_gpus is None:
        reason = f"no GPU in the cluster ({have}) and no autoscaler reports node types"
    else:
        reason = f"no GPU in the cluster ({have}) and the autoscaler has no GPU node type"
    spare = max(cpus - 1.0, 0.0)  # one whole CPU stays free for read/tokenize/write tasks (G3)
    k = num_actors or max(1, min(int(cpus), int(spare / CPU_ACTOR_CPUS)))
    if node_cpus is not None and len(node_cpus) > 1:  # e.g. two 1-CPU nodes: 0 (actors share the cores)
        spare = sum(max(float(c) - 1.0, 0.0) for c in node_cpus)
    per_actor = CPU_ACTOR_CPUS if k * CPU_ACTOR_CPUS <= spare else spare / k
    if per_actor < CPU_ACTOR_CPUS:
        logger.warning(
            "%d CPU actors at num_cpus=%.2f would leave no CPU for the read/tokenize tasks on a %g-CPU "
            "cluster; giving each actor num_cpus=%.3f instead (they will share cores)",
            k,
            CPU_ACTOR_CPUS,
            cpus,
            per_actor,
        )
    return {
        "num_actors": k,
        "min_actors": k,
        "max_actors": k,
        "num_cpus": per_actor,
        "num_gpus": 0,
        "device": "cpu",
        "fp16": False,
        "torch_threads": 1,
        "reason": reason,
    }


def resolve_items_file(items: str | os.PathLike) -> Path:
    """A parquet file, or a folder holding items.parquet -> the items file path (local, single file)."""
    src = resolve_items(items)
    if src.fs is not None or len(src.files) != 1:
        raise ValueError(f"{src.location} is not one local items file ({len(src.files)} files)")
    return Path(src.files[0])


def _model_dim(model_path: str) -> int:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_path)
    dim = getattr(cfg, "hidden_size", None)
    if not isinstance(dim, int):
        raise ValueError(
            f"model {model_path!r} config has no integer hidden_size; pass a BERT-family encoder model"
        )
    return dim


def _rows_per_block(n: int, max_actors: int, batch_size: int) -> int:
    """Rows per block: a block per actor for small catalogs (bucketing pads less in bigger blocks), at least
    MIN_BLOCK_BATCHES batches, at most MAX_ROWS_PER_BLOCK (more blocks than actors above 8,192 x actors)."""
    per_actor = math.ceil(n / max(max_actors, 1))
    return max(1, min(n, max(min(per_actor, MAX_ROWS_PER_BLOCK), MIN_BLOCK_BATCHES * batch_size)))


def _pool_size(plan: dict[str, Any]) -> str:
    lo, hi = plan["min_actors"], plan["max_actors"]
    return str(lo) if lo == hi else f"{lo} to {hi}"


# ---------------------------------------------------------------------------------------------- the output


class _Output:
    """The output folder (local or URI): lists, commits and cleans part files of one write id."""

    def __init__(self, out_dir: str | os.PathLike) -> None:
        import pyarrow.fs as pafs

        if storage.is_uri(out_dir):
            self.uri: str | None = os.fspath(out_dir)
            storage.check_replaceable(self.uri)
            self.fs, self.path = storage.filesystem_for(self.uri)
            self.location = storage.shown(self.uri)
        else:
            p = Path(out_dir).expanduser()
            if p.is_file():
                raise ValueError(f"{p} is a file; an artifact folder is needed there")
            self.uri, self.fs, self.path, self.location = None, None, str(p.resolve()), str(p)
        self._local = pafs.LocalFileSystem()

    def create(self) -> None:
        """Create a local output folder (once the input checked out; URIs need none)."""
        if self.fs is None:
            Path(self.path).mkdir(parents=True, exist_ok=True)

    def _files(self) -> list[Any]:
        import pyarrow.fs as pafs

        fs = self.fs or self._local
        infos = fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        return sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.base_name)

    def parts(self, prefix: str) -> tuple[list[str], int]:
        """(part file paths of this write, in name order; their total rows from the footers)."""
        import pyarrow.parquet as pq

        paths = [i.path for i in self._files() if i.base_name.startswith(prefix)]
        rows = 0
        for p in paths:
            with open_input(self.fs, p) as f:
                rows += pq.ParquetFile(f).metadata.num_rows
        return paths, rows

    def commit(self, fields: dict[str, Any], prefix: str) -> dict[str, Any]:
        """Write meta.json (the new version is now the artifact), then delete the old version's files."""
        if self.fs is None:
            meta = write_meta(self.path, "embed", **fields)
        else:
            meta = make_meta("embed", **fields)
            storage.write_bytes(storage.join(self.uri, META_FILE), meta_bytes(meta))
        fs = self.fs or self._local
        stale = [
            i.path
            for i in self._files()
            if (i.base_name.startswith(EMBEDDINGS_PART_PREFIX) and not i.base_name.startswith(prefix))
            or i.base_name
            in (EMBEDDINGS_FILE, EMBEDDINGS_FILE + ".tmp", storage.INCOMPLETE_MARK, storage.ADDED_MARK)
        ]
        for p in stale:
            fs.delete_file(p)
        if stale:
            logger.info("deleted %d file(s) of the previous version in %s", len(stale), self.location)
        return meta

    def delete_parts(self, prefix: str) -> None:
        """Best effort: remove the part files of a failed write."""
        fs = self.fs or self._local
        try:
            for i in self._files():
                if i.base_name.startswith(prefix):
                    fs.delete_file(i.path)
        except OSError as e:
            logger.warning("could not delete the part files %s* of the failed write: %s", prefix, e)


class _PartNames:
    """Ray Data filename provider (`get_filename_for_task` protocol): `<prefix><task index:06>-<write uuid>`.

    Ray Data appends `-<i>.parquet` and, when appending to a folder, insists on its write uuid in the name.
    With `preserve_order` the write tasks are numbered in block order, so name order is row order.
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.file_format = "parquet"

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"{self.prefix}{task_index:06d}-{write_uuid}.parquet"


# ---------------------------------------------------------------------------------------------- the workers


class _EmbedStats:
    """Ray actor (num_cpus=0): totals the encoder actors report, so the driver needs no per-item data."""

    def __init__(self) -> None:
        self.rows = self.tokens = self.padded = 0
        self.first_ts: float | None = None

    def add(self, rows: int, tokens: int, padded: int) -> None:
        self.rows += rows
        self.tokens += tokens
        self.padded += padded
        if self.first_ts is None:
            self.first_ts = time.time()

    def totals(self) -> dict[str, Any]:
        return {"rows": self.rows, "tokens": self.tokens, "padded": self.padded, "first_ts": self.first_ts}


class _Progress:
    """Context manager: a driver thread logging the stats actor's row count every 10 s."""

    def __init__(self, stats: Any, n: int, t0: float, every_s: float = 10.0) -> None:
        self.stats, self.n, self.t0, self.every_s = stats, n, t0, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _Progress:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        import ray

        while not self._stop.wait(self.every_s):
            try:
                done = ray.get(self.stats.totals.remote(), timeout=5)["rows"]
            except Exception:  # progress is best effort; the pipeline reports its own errors
                return
            dt = max(time.time() - self.t0, 1e-9)
            logger.info("embedded %d/%d items (%.0f items/s)", done, self.n, done / dt)


_TOKENIZERS: dict[tuple[str, int], TextTokenizer] = {}


def _tokenize_block(batch: dict[str, np.ndarray], model_path: str, max_length: int) -> dict[str, np.ndarray]:
    """Ray task: tokenize a block: int32 ids (R, w) right-padded to its longest row, lengths (R,)."""
    key = (model_path, max_length)
    if key not in _TOKENIZERS:  # once per Ray worker process
        _TOKENIZERS[key] = TextTokenizer(model_path, max_length=max_length)
    t = _TOKENIZERS[key](list(batch[TEXT]))
    return {ITEM_ID: batch[ITEM_ID], _IDS: t[_IDS], _LENGTH: t[_LENGTH]}


class _EncodeBatch:
    """Ray Data actor: one TextEncoder per actor; one block per call.

    Sorts the block's rows by token count, runs the encoder on `batch_size` consecutive rows at a time, each
    batch trimmed to its own longest row, and returns the rows in their input order as a pyarrow table
    (item_id string, embedding fixed_size_list<float32>[D]); reports rows / real tokens / padded tokens to the
    stats actor.
    """

    def __init__(
        self,
        model_path: str,
        max_length: int,
        batch_size: int,
        device: str,
        fp16: bool,
        num_threads: int | None,
        stats: Any = None,
    ) -> None:
        import torch

        if num_threads:
            torch.set_num_threads(num_threads)
        self.encoder = TextEncoder(model_path, device=device, max_length=max_length, fp16=fp16)
        self.batch_size = batch_size
        self.stats = stats

    def __call__(self, batch: dict[str, np.ndarray]) -> Any:
        import pyarrow as pa

        length = np.asarray(batch[_LENGTH])  # (R,)
        ids = _as_matrix(batch[_IDS], length)  # (R, w)
        order = np.argsort(length, kind="stable")  # (R,) shortest first
        vecs = np.empty((len(order), self.encoder.dim), np.float32)  # (R, D) in input order
        padded = 0
        for b0 in range(0, len(order), self.batch_size):
            rows = order[b0 : b0 + self.batch_size]
            w = int(length[rows].max())
            vecs[rows] = self.encoder.forward(  # (B, D)
                ids[rows, :w],
                attention_mask_from_length(length[rows], w),  # (B, w): padding tail dropped
            )
            padded += len(rows) * w
        if self.stats is not None:
            import ray

            ray.get(self.stats.add.remote(len(order), int(length.sum()), padded))  # before the rows leave
        return pa.table(
            {
                ITEM_ID: pa.array(list(batch[ITEM_ID]), type=pa.string()),
                EMBEDDING: pa.FixedSizeListArray.from_arrays(
                    pa.array(vecs.reshape(-1), type=pa.float32()), self.encoder.dim
                ),
            }
        )


def _as_matrix(ids: np.ndarray, length: np.ndarray) -> np.ndarray:
    """int32 (R, w) from a block's token ids; rows of different widths (blocks joined by Ray) are padded."""
    if ids.dtype != object:
        return ids
    width = int(length.max()) if len(length) else 0
    out = np.zeros((len(ids), width), np.int32)
    for i, row in enumerate(ids):
        out[i, : len(row)] = np.asarray(row)[:width]
    return out
