"""Embed a whole item catalog with Ray Data: `embed_catalog(items, out_dir) -> meta`.

Pipeline (all streaming, one Ray Data plan):

    from_arrow(items: item_id, text)                # read on the driver: the file need not be on other nodes
      -> repartition(n_blocks)                      # one table is one block (PLATFORM.md G4)
      -> map_batches(_tokenize_block) CPU tasks     # tokenize, pad to max_length: fixed-width int32 arrays
      -> sort("length")                             # length bucketing (bucketing="dataset", the default)
      -> map_batches(_EncodeBatch) actor pool       # encodes batch_size length-sorted rows at a time, each
                                                    #   batch trimmed to its longest row -> (B, D) float32
      -> iter_batches on the driver                 # collect, then reorder to items.parquet row order

Choices the design leaves open:
- Row order: the driver reads the `item_id` column with pyarrow and puts the pipeline's output back in that
  order (item ids must be unique, as the canonical items table promises; duplicates are refused).
- Actors: with GPUs in the cluster (and device "auto" or "cuda") one actor per GPU (`num_gpus=1`,
  `num_cpus=1`, fp16). Otherwise CPU actors with 1 torch thread each and `num_cpus=0.5`, sized so the actors
  together hold at most `CPUs - 1`, which leaves a whole CPU for the read/tokenize tasks (the actor-pool
  deadlock of PLATFORM.md G3). Default CPU pool size: min(CPUs, 2 * (CPUs - 1)), at least 1.
- Length bucketing, `bucketing="dataset"` (default): `Dataset.sort("length")` after tokenizing, so every
  encoder batch is a run of similar lengths (a shuffle barrier, cheap next to the encoder: tokenizing is
  ~100x faster than encoding). `bucketing="group"`: no sort stage; each actor call takes
  min(8 * batch_size, ceil(N / (4 * actors))) rows (at least batch_size) and sorts those. Either way the
  actor sorts its call's rows and trims each batch to its longest row. `padding_efficiency` in meta is real
  tokens / padded tokens over all encoder batches; on the 9,742 MovieLens item texts with batch 128 (by
  hand from the token lengths): 0.33 unsorted, 0.68 sorted in groups of 1024, 0.97 sorted globally.
- Blocks: max(4 * actors, ceil(N / 2000)) blocks, at most N.
- `dataset_fingerprint` is the prepare stage's fingerprint (its meta's `dataset_fingerprint`, else
  `fingerprint`) when `items` is `items.parquet` in a prepare folder, else the sha256 prefix of the items
  file; `items_sha256` is always the latter.
- Timing in meta: `wall_s` covers validation, actor start-up and model loads, the pipeline and the write
  (not `ray.init`); `first_batch_s` is pipeline start to the first embedded batch (the fixed cost).
- The input path must be readable from every Ray node (local path on one machine, shared storage otherwise).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from llmrec.artifacts import file_fingerprint, write_meta
from llmrec.embed.encoder import TextEncoder, TextTokenizer, attention_mask_from_length, resolve_model
from llmrec.schema import EMBEDDING, EMBEDDINGS_FILE, ITEM_ID, ITEMS_FILE, META_FILE, TEXT

logger = logging.getLogger(__name__)

__all__ = ["embed_catalog", "resolve_items_file", "plan_actors"]

_LENGTH = "length"
_IDS = "input_ids"
_WIDTH = "_padded_width"
CPU_ACTOR_CPUS = 0.5
# bucketing="group": an actor call sorts up to 8 * batch_size rows by length, encodes batch_size at a time
BUCKET_FACTOR = 8


def embed_catalog(
    items: str | os.PathLike,
    out_dir: str | os.PathLike,
    model: str | os.PathLike | None = None,
    batch_size: int = 128,
    max_length: int = 128,
    num_actors: int | None = None,
    device: str = "auto",
    ray_address: str | None = None,
    bucketing: str = "dataset",
) -> dict[str, Any]:
    """Embed every item's `text` and write `out_dir/embeddings.parquet` + `meta.json`.

    Args:
        items: the canonical items table: a parquet file, or a `llmrec prepare` folder with items.parquet.
            Needs columns `item_id` (string, unique, non-empty) and `text` (string, non-null).
        out_dir: artifact folder to write (created if missing; existing files are replaced).
        model: local HF model folder or hub name; None = the packaged all-MiniLM-L6-v2.
        batch_size: rows per encoder forward pass.
        max_length: token limit per text.
        num_actors: encoder actors; None = one per GPU, or the CPU rule in the module docstring.
        device: "auto" (GPU actors when the cluster has GPUs), "cpu" or "cuda".
        ray_address: Ray cluster to join; None = the running Ray, $RAY_ADDRESS, or a new local one.
        bucketing: "dataset" (sort all rows by token count with `Dataset.sort`: least padding) or "group"
            (sort within each actor call of up to 8 * batch_size rows: no shuffle barrier).

    Returns:
        The meta dict written to `out_dir/meta.json` (stage "embed").

    Raises:
        ValueError: missing columns, null/duplicate ids, null texts, an empty catalog, bad arguments.
        FileNotFoundError: `items` does not exist.

    Example::

        meta = embed_catalog("run/data", "run/embeddings")   # all-MiniLM-L6-v2, 384-d
        print(meta["n_items"], meta["items_per_s"])
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from llmrec.raysetup import cluster_cpus, cluster_gpus, init_ray

    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
    if num_actors is not None and (not isinstance(num_actors, int) or num_actors < 1):
        raise ValueError(f"num_actors must be a positive int or None, got {num_actors!r}")
    if bucketing not in ("dataset", "group"):
        raise ValueError(f"bucketing must be 'dataset' or 'group', got {bucketing!r}")
    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")

    t_start = time.perf_counter()
    items_file = resolve_items_file(items)
    item_ids = _read_and_check_items(items_file)  # (N,) object, the output row order
    n = len(item_ids)
    model_path, model_name = resolve_model(model)
    dim = _model_dim(model_path)

    t_ray = time.perf_counter()
    init_ray(ray_address)
    ray_init_s = time.perf_counter() - t_ray  # not part of wall_s (a no-op when Ray is already up)
    cpus, gpus = cluster_cpus(), cluster_gpus()
    plan = plan_actors(cpus, gpus, device=device, num_actors=num_actors)
    n_blocks = max(1, min(n, max(4 * plan["num_actors"], math.ceil(n / 2000))))
    # rows per actor call: bucketing sorts within a call, so bigger is better for padding, but every actor
    # should get a few calls
    group = max(batch_size, min(BUCKET_FACTOR * batch_size, math.ceil(n / (4 * plan["num_actors"]))))
    if bucketing == "dataset":
        group = batch_size  # rows arrive sorted already
    logger.info(
        "embedding %d items from %s with %s: %d %s actor(s) (num_cpus=%.2f, num_gpus=%d), %d blocks, "
        "batch %d, %d rows per actor call, bucketing %s",
        n,
        items_file,
        model_name,
        plan["num_actors"],
        plan["device"],
        plan["num_cpus"],
        plan["num_gpus"],
        n_blocks,
        batch_size,
        group,
        bucketing,
    )

    # the driver sends the rows (object store) rather than Ray Data reading the file, so the items file only
    # has to exist where this runs: a staged copy of an s3:// input, or a local disk on a multi-node cluster
    ds = ray.data.from_arrow(pq.read_table(items_file, columns=[ITEM_ID, TEXT]))
    ds = ds.repartition(n_blocks)
    ds = ds.map_batches(
        _tokenize_block,
        batch_size=None,  # the whole block per task
        batch_format="numpy",
        fn_kwargs={"model_path": model_path, "max_length": max_length},
    )
    if bucketing == "dataset":
        ds = ds.sort(_LENGTH)
    ds = ds.map_batches(
        _EncodeBatch,
        batch_size=group,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=plan["num_actors"]),
        fn_constructor_kwargs={
            "model_path": model_path,
            "max_length": max_length,
            "batch_size": batch_size,
            "device": plan["device"],
            "fp16": plan["fp16"],
            "num_threads": plan["torch_threads"],
        },
        num_cpus=plan["num_cpus"],
        num_gpus=plan["num_gpus"],
    )

    got_ids: list[np.ndarray] = []
    got_vecs: list[np.ndarray] = []
    n_tokens = n_padded = 0
    done, t_pipe, t_log = 0, time.perf_counter(), 0.0
    first_batch_s = None
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        got_ids.append(np.asarray(batch[ITEM_ID], dtype=object))
        got_vecs.append(np.asarray(batch[EMBEDDING], dtype=np.float32))
        n_tokens += int(batch[_LENGTH].sum())
        n_padded += int(batch[_WIDTH].sum())
        done += len(batch[ITEM_ID])
        now = time.perf_counter()
        if first_batch_s is None:
            first_batch_s = now - t_pipe
        if now - t_log > 5.0 or done == n:
            t_log = now
            logger.info("embedded %d/%d items (%.0f items/s)", done, n, done / max(now - t_pipe, 1e-9))

    ids_out, vecs = _reorder(item_ids, got_ids, got_vecs, dim)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            ITEM_ID: pa.array(ids_out, type=pa.string()),
            EMBEDDING: pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1), type=pa.float32()), dim),
        }
    )
    tmp = out / (EMBEDDINGS_FILE + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, out / EMBEDDINGS_FILE)

    wall_s = time.perf_counter() - t_start - ray_init_s
    items_sha = file_fingerprint([items_file])
    meta = write_meta(
        out,
        "embed",
        model_name=model_name,
        model_path=model_path,
        dim=dim,
        normalized=True,
        max_length=max_length,
        pooling="mean",
        n_items=n,
        dataset_fingerprint=_prepare_fingerprint(items_file) or items_sha,
        items_sha256=items_sha,
        items_file=str(items_file),
        wall_s=round(wall_s, 3),
        items_per_s=round(n / wall_s, 2),
        first_batch_s=round(first_batch_s or 0.0, 3),
        batch_size=batch_size,
        num_actors=plan["num_actors"],
        device=plan["device"],
        fp16=plan["fp16"],
        n_blocks=n_blocks,
        rows_per_actor_call=group,
        bucketing=bucketing,
        padding_efficiency=round(n_tokens / max(n_padded, 1), 4),
    )
    logger.info(
        "embedded %d items in %.1fs (%.0f items/s, padding efficiency %.2f) -> %s",
        n,
        wall_s,
        n / wall_s,
        meta["padding_efficiency"],
        out / EMBEDDINGS_FILE,
    )
    return meta


def resolve_items_file(items: str | os.PathLike) -> Path:
    """A parquet file, or a folder holding items.parquet -> the items file path."""
    p = Path(items).expanduser()
    if p.is_dir():
        f = p / ITEMS_FILE
        if not f.is_file():
            raise FileNotFoundError(
                f"{p} is a folder without {ITEMS_FILE}; pass the items parquet file or the folder written "
                "by `llmrec prepare`"
            )
        return f.resolve()
    if not p.is_file():
        raise FileNotFoundError(
            f"items table {p} does not exist; pass a parquet file or a `llmrec prepare` folder"
        )
    return p.resolve()


def plan_actors(
    cpus: float, gpus: float, device: str = "auto", num_actors: int | None = None
) -> dict[str, Any]:
    """Decide the encoder actor pool from the cluster's resources (see the module docstring).

    Returns:
        {"num_actors", "num_cpus" (per actor), "num_gpus" (per actor), "device", "fp16", "torch_threads"}
    """
    use_gpu = gpus >= 1 and device != "cpu"
    if device.startswith("cuda") and gpus < 1:
        raise ValueError(
            f"device {device!r} asked for, but the Ray cluster has no GPU (resources: {cpus:g} CPU, "
            f"{gpus:g} GPU); use --device cpu or auto"
        )
    if use_gpu:
        k = num_actors or int(gpus)
        if k > gpus:
            raise ValueError(
                f"num_actors={k} GPU actors need {k} GPUs, the cluster has {gpus:g}; pass at most {int(gpus)}"
            )
        return {
            "num_actors": k,
            "num_cpus": 1.0,
            "num_gpus": 1,
            "device": "cuda",
            "fp16": True,
            "torch_threads": None,
        }
    spare = max(cpus - 1.0, 0.0)  # one whole CPU stays free for read/tokenize tasks (G3)
    k = num_actors or max(1, min(int(cpus), int(spare / CPU_ACTOR_CPUS)))
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
        "num_cpus": per_actor,
        "num_gpus": 0,
        "device": "cpu",
        "fp16": False,
        "torch_threads": 1,
    }


# ---------------------------------------------------------------------------------------------- helpers


def _read_and_check_items(items_file: Path) -> np.ndarray:
    """Validate the items table (schema, ids, texts) on the driver; return item_id (N,) object, file order."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    schema = pq.read_schema(items_file)
    missing = [c for c in (ITEM_ID, TEXT) if c not in schema.names]
    if missing:
        raise ValueError(
            f"{items_file} lacks column(s) {missing}: an items table needs {ITEM_ID!r} (string) and {TEXT!r} "
            f"(string), got columns {schema.names}; build it with `llmrec prepare`"
        )
    for col in (ITEM_ID, TEXT):
        t = schema.field(col).type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
            raise ValueError(
                f"{items_file}: column {col!r} must be string, got {t}; "
                "cast it to string (as `llmrec prepare` does)"
            )
    table = pq.read_table(items_file, columns=[ITEM_ID, TEXT])
    n = table.num_rows
    if n == 0:
        raise ValueError(f"{items_file} has no rows; nothing to embed")
    for col in (ITEM_ID, TEXT):
        nulls = table.column(col).null_count
        if nulls:
            first = pc.index(pc.is_null(table.column(col)), True).as_py()
            raise ValueError(
                f"{items_file}: {nulls} null value(s) in {col!r} (first at row {first}); "
                "fill or drop those rows"
            )
    ids = np.asarray(table.column(ITEM_ID).to_numpy(zero_copy_only=False), dtype=object)
    empty = int(pc.sum(pc.equal(pc.utf8_length(table.column(ITEM_ID)), 0)).as_py() or 0)
    if empty:
        raise ValueError(f"{items_file}: {empty} empty {ITEM_ID!r} value(s); every item needs a non-empty id")
    uniq, counts = np.unique(ids.astype(str), return_counts=True)
    if len(uniq) != n:
        dups = uniq[counts > 1]
        raise ValueError(
            f"{items_file}: {len(dups)} duplicated {ITEM_ID!r} value(s) "
            f"(e.g. {[str(d) for d in dups[:5]]}); ids must be unique"
        )
    return ids


def _model_dim(model_path: str) -> int:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_path)
    dim = getattr(cfg, "hidden_size", None)
    if not isinstance(dim, int):
        raise ValueError(
            f"model {model_path!r} config has no integer hidden_size; pass a BERT-family encoder model"
        )
    return dim


def _prepare_fingerprint(items_file: Path) -> str | None:
    meta_path = items_file.parent / META_FILE
    if items_file.name != ITEMS_FILE or not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if meta.get("stage") != "prepare":
        return None
    fp = meta.get("dataset_fingerprint") or meta.get("fingerprint")
    return str(fp) if fp else None


def _reorder(
    item_ids: np.ndarray, got_ids: list[np.ndarray], got_vecs: list[np.ndarray], dim: int
) -> tuple[np.ndarray, np.ndarray]:
    """Put the pipeline's rows back in items order; (N,) ids, (N, D) float32."""
    import pandas as pd

    n = len(item_ids)
    ids = np.concatenate(got_ids) if got_ids else np.zeros((0,), object)
    vecs = np.concatenate(got_vecs) if got_vecs else np.zeros((0, dim), np.float32)
    pos = pd.Index(item_ids).get_indexer(ids)  # (n_got,) row in items order, -1 if unknown
    if len(ids) != n or (pos < 0).any() or len(np.unique(pos)) != n or vecs.shape != (n, dim):
        raise RuntimeError(
            f"embed pipeline returned {len(ids)} rows / vectors {vecs.shape} for {n} items of dim {dim} "
            f"({int((pos < 0).sum())} unknown ids); this is a bug, please report it"
        )
    out = np.empty((n, dim), np.float32)
    out[pos] = vecs
    return item_ids, out


@functools.lru_cache(maxsize=4)
def _cached_tokenizer(model_path: str, max_length: int) -> TextTokenizer:
    return TextTokenizer(model_path, max_length=max_length)  # once per Ray worker process


def _tokenize_block(batch: dict[str, np.ndarray], model_path: str, max_length: int) -> dict[str, np.ndarray]:
    """Ray task: tokenize one block, padded to max_length (fixed-width int32, so blocks concatenate)."""
    tok = _cached_tokenizer(model_path, max_length)
    t = tok(list(batch[TEXT]), pad_to_max_length=True)
    return {ITEM_ID: batch[ITEM_ID], _IDS: t[_IDS], _LENGTH: t[_LENGTH]}


class _EncodeBatch:
    """Ray Data actor: one TextEncoder per actor.

    Takes a group of up to BUCKET_FACTOR * batch_size tokenized rows, sorts them by token count and runs the
    encoder on `batch_size` consecutive rows at a time, each trimmed to its own longest row. Returns the rows
    (ids with their (D,) float32 unit vectors) in that sorted order; the driver restores the items order.
    """

    def __init__(
        self,
        model_path: str,
        max_length: int,
        batch_size: int,
        device: str,
        fp16: bool,
        num_threads: int | None,
    ) -> None:
        import torch

        if num_threads:
            torch.set_num_threads(num_threads)
        self.encoder = TextEncoder(model_path, device=device, max_length=max_length, fp16=fp16)
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        length = np.asarray(batch[_LENGTH])  # (G,)
        ids = np.asarray(batch[_IDS])  # (G, max_length)
        order = np.argsort(length, kind="stable")  # (G,) shortest first
        vecs = np.empty((len(order), self.encoder.dim), np.float32)  # (G, D) in sorted order
        width = np.zeros(len(order), np.int32)
        for b0 in range(0, len(order), self.batch_size):
            rows = order[b0 : b0 + self.batch_size]
            w = int(length[rows].max())
            vecs[b0 : b0 + len(rows)] = self.encoder.forward(  # (B, D)
                ids[rows, :w],
                attention_mask_from_length(length[rows], w),  # (B, w): padding tail dropped
            )
            width[b0 : b0 + len(rows)] = w
        return {ITEM_ID: batch[ITEM_ID][order], EMBEDDING: vecs, _LENGTH: length[order], _WIDTH: width}
