"""Scale benchmark: driver peak RSS, wall time and worker memory of each batch stage at growing sizes.

Every measurement runs in a fresh child process (`_child`) that starts its own local Ray, runs one stage
function once and reports: the driver's peak RSS (VmHWM of the child itself), the stage's wall time, and the
Ray worker processes' memory (peak RSS of the largest worker and of all workers together, sampled every
0.25 s from the raylet's children). The parent prepares the inputs, runs the children one at a time, and
prints
one JSON report with ratios: each size against the smallest (driver RSS growth, throughput per core) and the
new code path against today's (`main`'s) in the same run.

Stages are functions `stage_<name>(params, work) -> dict` registered in STAGES, each measured by the same
harness. Today's code path of a stage is its file on the `main` branch (`git show main:<path>`), loaded as a
module of its own, so both run on the same machine in the same run (embed only; the other stages run today's
code).

- embed: `llmrec embed` of synthetic catalogs (`llmrec.data.synthetic.write_sharded`, one parquet file, so
  both paths read the same input) with a tiny random-init BERT (2 layers, 32-d, MiniLM's tokenizer: the
  encoder is not the bottleneck), batch 128, max 128 tokens, default actors.
- index: `llmrec index --kind KIND` (each of --index-kinds; hnsw up to --hnsw-max-items) over
  benchmarks/index.py's clustered 384-d vectors; build wall, driver RSS, the recall@10 vs exact written to
  meta.json, then that benchmark's search child for queries/s and held-out recall. No Ray.
- train: `llmrec train` with TRAIN_FLAGS (one epoch, at most --train-max-steps batches of it) on synthetic
  interactions (20k items, events / 3 users) through `llmrec prepare`, with random unit item vectors
  (`write_random_embeddings`) so that no embedding cost is measured.
- recommend: `llmrec recommend --k 10` for the first N users of one run (a flat index and a scorer trained
  once on the same catalog); users/s.

    .venv/bin/python benchmarks/scale.py --stages embed --sizes 10000 100000 1000000 --out scale.json
    .venv/bin/python benchmarks/scale.py --stages embed --sizes 100000 --model minilm --paths new
    .venv/bin/python benchmarks/scale.py --stages index,train,recommend --stage-sizes index=100000,1000000 \
        train=100000,1000000 recommend=10000,100000 --work /tmp/scale --out scale-stages.json
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmrec.artifacts import write_json_report

logger = logging.getLogger("benchmarks.scale")

REPO = Path(__file__).resolve().parents[1]
CORES = 2  # the local Ray of every child gets this many CPUs (the machine this was written for has 2)


# ------------------------------------------------------------------------------------------ the harness


def _status_kib(pid: int | str, key: str) -> int:
    """A `kB` field of /proc/<pid>/status (VmHWM, VmRSS), 0 when the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _title(pid: int) -> str:
    """A Ray worker's process title (ray::MapWorker(...), ray::ReadFiles..., ray::IDLE), or ''."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")[:80]
    except OSError:
        return ""


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, ValueError, IndexError):
                continue
    return out


class WorkerMemory:
    """Samples the Ray worker processes (children of this session's raylet): peak VmHWM of the largest one
    (it counts the object-store pages a worker touched, which live in shared memory), the largest private
    (RssAnon) size seen, and the largest sum of VmRSS over all of them at one time."""

    def __init__(self, every_s: float = 0.25) -> None:
        import ray

        node = ray._private.worker._global_node
        self.raylet = node.all_processes["raylet"][0].process.pid
        self.every_s = every_s
        self.max_one_kib = self.max_sum_kib = self.max_anon_kib = 0
        self.max_one_name = ""
        self._seen: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> WorkerMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _sample(self) -> None:
        pids = _children(self.raylet)
        self._seen.update(pids)
        for p in pids:
            hwm = _status_kib(p, "VmHWM")
            if hwm > self.max_one_kib:
                self.max_one_kib, self.max_one_name = hwm, _title(p)
            self.max_anon_kib = max(self.max_anon_kib, _status_kib(p, "RssAnon"))
        self.max_sum_kib = max(self.max_sum_kib, sum(_status_kib(p, "VmRSS") for p in pids))

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self._sample()

    def report(self) -> dict[str, Any]:
        return {
            "worker_peak_rss_mib": round(self.max_one_kib / 1024, 1),
            "worker_peak_rss_process": self.max_one_name,
            "worker_peak_anon_mib": round(self.max_anon_kib / 1024, 1),
            "workers_sum_rss_mib": round(self.max_sum_kib / 1024, 1),
            "n_worker_processes": len(self._seen),
        }


def _child(stage: str, params: dict[str, Any], work: Path) -> dict[str, Any]:
    """Run one stage in this (fresh) process on its own local Ray (none for NO_RAY stages); add driver and
    worker memory."""
    if stage in NO_RAY:
        res = STAGES[stage](params, work)
        return {**res, "driver_peak_rss_mib": round(_status_kib("self", "VmHWM") / 1024, 1)}
    import ray

    from llmrec.raysetup import init_ray, local_env_defaults, ray_detail_to_log_files

    local_env_defaults()
    ray_detail_to_log_files()  # Ray Data's progress dumps to the session's log files
    t0 = time.perf_counter()
    init_ray(None, num_cpus=CORES, dashboard=False)
    ray_init_s = time.perf_counter() - t0
    try:
        with WorkerMemory() as mem:
            res = STAGES[stage](params, work)
    finally:
        ray.shutdown()
    return {
        **res,
        **mem.report(),
        "ray_init_s": round(ray_init_s, 2),
        "driver_peak_rss_mib": round(_status_kib("self", "VmHWM") / 1024, 1),
    }


def measure(stage: str, params: dict[str, Any], work: Path, timeout_s: float, extra_path: str | None) -> dict:
    """Run `_child(stage, params)` in a new process; its JSON result, or {"error": ...}."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), extra_path, os.environ.get("PYTHONPATH")) if p),
    }
    if stage == "index":  # idle OpenMP threads sleep instead of spinning on shared cores (as in index.py)
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    cmd = [sys.executable, __file__, "_child", stage, json.dumps(params), str(work)]
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f}s"}
    if r.returncode != 0:
        return {"error": f"exit {r.returncode}: {r.stderr[-1500:]}"}
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["process_s"] = round(time.perf_counter() - t0, 1)
    return out


# ------------------------------------------------------------------------------------------ stage: embed


def _tiny_model(work: Path) -> str:
    """A random-init 2-layer, 32-d BERT with MiniLM's tokenizer (tests/conftest.py's tiny_model_dir)."""
    out = work / "tiny-bert"
    if (out / "config.json").is_file():
        return str(out)
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from llmrec.embed.encoder import default_model_path

    tok = AutoTokenizer.from_pretrained(default_model_path())
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    BertModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def _legacy_module(work: Path, rel: str) -> Path:
    """`main`'s version of a module, written to work/legacy/<name>_main.py (importable by Ray workers too)."""
    src = subprocess.run(
        ["git", "show", f"main:{rel}"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    d = work / "legacy"
    d.mkdir(parents=True, exist_ok=True)
    f = d / (Path(rel).stem + "_main.py")
    f.write_text(src)
    return f


def stage_embed(params: dict[str, Any], work: Path) -> dict[str, Any]:
    """`embed_catalog` of params["items"] (today's path: main's module) -> meta fields; checks the output."""
    import numpy as np
    import pyarrow.parquet as pq

    if params["path"] == "old":
        # main's module, on PYTHONPATH (work/legacy) so that Ray workers import it by name too
        embed_catalog: Callable[..., dict] = importlib.import_module("ray_embed_main").embed_catalog
    else:
        from llmrec.embed.ray_embed import embed_catalog
    out = Path(tempfile.mkdtemp(prefix="emb-", dir=work))
    meta = embed_catalog(params["items"], out, model=params["model"], batch_size=128, max_length=128)
    from llmrec.embed.artifact import iter_embeddings

    # the output: every item once, unit vectors, and (new path) in the input's order
    n, first_ids = 0, []
    for ids, vecs in iter_embeddings(out, batch_rows=65536):
        n += len(ids)
        assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-3)
        if len(first_ids) < 5:
            first_ids += list(ids[: 5 - len(first_ids)])
    first = (
        params["items"]
        if params["items"].endswith(".parquet")
        else sorted(Path(params["items"]).glob("*.parquet"))[0]
    )
    want = pq.read_table(first, columns=["item_id"]).slice(0, 5).column(0).to_pylist()
    assert n == meta["n_items"] and first_ids == want, (n, first_ids, want)
    files = sorted(p for p in out.iterdir() if p.suffix == ".parquet")
    res = {
        k: meta.get(k)
        for k in (
            "n_items",
            "wall_s",
            "items_per_s",
            "first_batch_s",
            "num_actors",
            "device",
            "n_blocks",
            "rows_per_actor_call",
            "bucketing",
            "padding_efficiency",
            "n_parts",
        )
    }
    res["output_files"] = len(files)
    res["items_per_s_per_core"] = round(meta["items_per_s"] / CORES, 1)
    for p in files:
        p.unlink()
    return res


# ------------------------------------------------------------------------------------------ stage: index


def stage_index(params: dict[str, Any], work: Path) -> dict[str, Any]:
    """`llmrec index --kind KIND` of params["embeddings"], in this process as a user runs it -> build wall,
    the meta's recall@10 vs exact (approximate kinds; the exact flat kind is 1.0 by construction)."""
    from llmrec.artifacts import read_meta

    out = Path(params["out"])
    rss0 = _status_kib("self", "VmRSS")
    t0 = time.perf_counter()
    _cli(
        [
            "index",
            "--embeddings",
            params["embeddings"],
            "--out",
            str(out),
            "--kind",
            params["kind"],
            "--device",
            "cpu",
            "--sample",
            "1000",
        ]
    )
    wall = time.perf_counter() - t0
    meta = read_meta(out, "index")
    return {
        "n_items": meta["n_items"],
        "kind": meta["kind"],
        "factory": meta.get("factory"),
        "wall_s": round(wall, 1),  # the whole command: imports, read, train, add, recall check, write
        "build_s": round(meta["build_s"], 1),  # meta: the index build itself
        "items_per_s_per_core": round(meta["n_items"] / wall / CORES, 1),
        "recall_at_10": meta.get("recall_at_10", 1.0 if meta["kind"] in ("flat", "torch") else None),
        "index_mib": round(meta["index_bytes"] / 2**20, 1),
        "train_size": meta.get("train_size"),
        "params": {
            k: v for k, v in meta.get("params", {}).items() if k in ("M", "ef_search", "nlist", "nprobe")
        },
        "rss_before_mib": round(rss0 / 1024, 1),
    }


def _index_bench() -> Any:
    """benchmarks/index.py as a module (its dataset writer and search child are reused, not copied)."""
    spec = importlib.util.spec_from_file_location("benchmarks_index", Path(__file__).with_name("index.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _index_search(data: Path, out: Path, kind: str) -> dict[str, Any]:
    """Queries/s and recall of the built index: benchmarks/index.py's search child (its own process, 1
    thread), on that benchmark's held-out queries and exact top-10."""
    index_bench = _index_bench()
    exact = kind == "flat"
    job = {
        "mode": "search",
        "kind": kind,
        "data": str(data),
        "out": str(out),
        "device": "cpu",
        "threads": 1,
        "batch_queries": 200 if exact else 1000,
        "single_queries": 20 if exact else 200,
        "exclude": 100,
    }
    r = index_bench.run_child(job)
    out = {k: r[k] for k in ("batch_qps", "batch_qps_per_cpu_s", "single_ms_p50", "index_rss_mib")}
    out["heldout_recall_at_10"] = r["recall_at_10"]  # held-out queries (the build's is in recall_at_10)
    return out


# ------------------------------------------------------------------------------------------ stage: train

CATALOG_ITEMS = 20_000  # the train and recommend runs share one catalog: events and users grow, items stay
EVENTS_PER_USER = 3  # users = events / 3 (a mean of 3, heavy-tailed): the recommend stage reuses this data
TEXT_DIM = 384  # MiniLM's width: the text vectors the scorer reads are this wide in production
# a small scorer (the model the CLI builds, at 32-d with 20 history events) so that one epoch of 1M events
# fits the time on 2 shared cores; the data path (Ray Data samples -> Train workers) is the default one
TRAIN_FLAGS = [
    "--epochs",
    "1",
    "--dim",
    "32",
    "--max-len",
    "20",
    "--n-neg",
    "64",
    "--batch-size",
    "512",
    "--val-users",
    "1000",
    "--num-workers",
    "1",
]


def _cli(argv: list[str]) -> None:
    """One `llmrec` command in this process, exactly as `llmrec ARGV` runs it; raises on a non-zero exit."""
    from llmrec.cli import main as llmrec_main

    rc = llmrec_main(argv)
    if rc != 0:
        raise RuntimeError(f"llmrec {' '.join(argv)} exited {rc}")


def _cli_process(argv: list[str]) -> None:
    """One `llmrec` command in a new process (setup steps: the harness process stays small)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
    }
    r = subprocess.run([sys.executable, "-m", "llmrec", *argv], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"llmrec {' '.join(argv)} exited {r.returncode}: {r.stderr[-2000:]}")


def write_random_embeddings(
    out: Path, item_ids: list[str], dim: int, seed: int = 0, part_rows: int = 65_536
) -> dict:
    """An `llmrec embed` artifact (sharded layout: part files + meta.json written last by `write_meta`) of
    seeded random unit vectors (len(item_ids), dim), so the stages after embed run without paying for it.

    The vector of an item depends only on (seed, its position), so two artifacts of the same ids are equal.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from llmrec.artifacts import write_meta
    from llmrec.embed.encoder import DEFAULT_MODEL_NAME
    from llmrec.schema import EMBEDDING, ITEM_ID

    out.mkdir(parents=True, exist_ok=True)
    prefix = f"part-random{seed}-"
    n_parts = 0
    for n_parts, c0 in enumerate(range(0, len(item_ids), part_rows), start=1):
        ids = item_ids[c0 : c0 + part_rows]
        x = np.random.default_rng([seed, c0]).normal(size=(len(ids), dim)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        col = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1), pa.float32()), dim)
        pq.write_table(
            pa.table({ITEM_ID: pa.array(ids, pa.string()), EMBEDDING: col}),
            out / f"{prefix}{n_parts - 1:06d}.parquet",
        )
    # named as the bundled encoder's vectors (384-d): consumers that encode text into the items' space
    # (synthesised training feedback, text queries) load that model instead of failing on an unknown name
    return write_meta(
        out,
        "embed",
        model_name=DEFAULT_MODEL_NAME,
        dim=dim,
        normalized=True,
        n_items=len(item_ids),
        parts_prefix=prefix,
        n_parts=n_parts,
        dataset_fingerprint=f"random-unit-{len(item_ids)}x{dim}-seed{seed}",
        note="benchmarks/scale.py: seeded random unit vectors, not the encoder's output",
    )


def _link(link: Path, target: Path) -> None:
    """link -> target (a folder), replacing a link that points elsewhere or nowhere."""
    if link.is_symlink() and link.resolve() != target.resolve():
        link.unlink()
    if not link.exists():
        link.symlink_to(target.resolve(), target_is_directory=True)


def _events_run(work: Path, n_events: int, n_users: int) -> Path:
    """work/ev-E-u-U: a `llmrec prepare`d synthetic dataset (CATALOG_ITEMS items, n_users users, n_events
    events, planted topics) in data/, plus the shared catalog's random embeddings as embeddings/ (a link).
    Reused when already there."""
    import pyarrow.parquet as pq

    from llmrec.data.synthetic import write_sharded
    from llmrec.schema import INTERACTIONS_FILE, ITEM_ID, ITEMS_FILE, RUN_DATA, RUN_EMBEDDINGS

    run = work / f"ev-{n_events}-u-{n_users}"
    data = run / RUN_DATA
    if not (data / INTERACTIONS_FILE).is_file():
        raw = run / "raw"
        logger.info("setup: synthetic %d events, %d users, %d items ...", n_events, n_users, CATALOG_ITEMS)
        write_sharded(raw, n_items=CATALOG_ITEMS, n_users=n_users, n_events=n_events, n_shards=16, seed=0)
        _cli_process(
            [
                "prepare",
                "--dataset",
                "generic",
                "--source",
                str(raw),
                "--items",
                "items",
                "--interactions",
                "interactions",
                "--out",
                str(data),
            ]
        )
    emb = work / f"catalog-{CATALOG_ITEMS}" / RUN_EMBEDDINGS
    if not (emb / "meta.json").is_file():
        ids = pq.read_table(data / ITEMS_FILE, columns=[ITEM_ID]).column(0).to_pylist()
        write_random_embeddings(emb, ids, TEXT_DIM)
    _link(run / RUN_EMBEDDINGS, emb)
    return run


def stage_train(params: dict[str, Any], work: Path) -> dict[str, Any]:
    """`llmrec train` (TRAIN_FLAGS: one epoch; params["max_steps"] batches of it at most, when set) of
    params["run"]'s data and embeddings, in this process."""
    from llmrec.artifacts import read_meta
    from llmrec.schema import RUN_DATA, RUN_EMBEDDINGS

    run, out = Path(params["run"]), Path(params["out"])
    steps = [] if params.get("max_steps") is None else ["--max-steps", str(params["max_steps"])]
    t0 = time.perf_counter()
    _cli(
        [
            "train",
            "--data",
            str(run / RUN_DATA),
            "--embeddings",
            str(run / RUN_EMBEDDINGS),
            "--out",
            str(out),
            *TRAIN_FLAGS,
            *steps,
        ]
    )
    wall = time.perf_counter() - t0
    meta = read_meta(out, "train")
    ep = meta["history"][-1] if meta.get("history") else {}
    return {
        "n_events": params["size"],
        "wall_s": round(wall, 1),
        "fit_wall_s": round(meta["wall_s"], 1),
        "examples": ep.get("examples"),
        "epoch_train_s": round(ep.get("train_s", float("nan")), 1),
        # fit_wall_s - epoch_train_s is the fixed part: worker start, validation, the co-occurrence matrix and
        # the choices made on validation after training (cooc weight, text boost, cold bonus), the write
        "cooc_s": round(meta.get("cooc", {}).get("seconds", float("nan")), 1),
        "examples_per_s": round(meta["examples_per_s"], 1),
        "items_per_s_per_core": round(meta["examples_per_s"] / CORES, 1),  # examples/s per core
        "val_ndcg_at_10": meta["metrics"].get("val_ndcg@10"),
        "flags": " ".join([*TRAIN_FLAGS, *steps]),
    }


# ------------------------------------------------------------------------------------------ stage: recommend


def _recommend_run(work: Path, n_users: int) -> Path:
    """A run folder of n_users users: data (the train stage's synthetic data of EVENTS_PER_USER * n_users
    events), the shared catalog's embeddings, a flat index and a tiny scorer trained
    once (one epoch of the 100k-event data with TRAIN_FLAGS) on that same catalog, all linked in."""
    from llmrec.schema import RUN_EMBEDDINGS, RUN_INDEX, RUN_SCORER

    run = _events_run(work, EVENTS_PER_USER * n_users, n_users)
    cat = work / f"catalog-{CATALOG_ITEMS}"
    if not (cat / RUN_INDEX / "meta.json").is_file():
        _cli_process(
            [
                "index",
                "--embeddings",
                str(cat / RUN_EMBEDDINGS),
                "--out",
                str(cat / RUN_INDEX),
                "--kind",
                "flat",
                "--device",
                "cpu",
            ]
        )
    if not (cat / RUN_SCORER / "meta.json").is_file():
        small = _events_run(work, 100_000, 10_000)
        logger.info("setup: training the tiny scorer for recommend ...")
        _cli_process(
            [
                "train",
                "--data",
                str(small / "data"),
                "--embeddings",
                str(cat / RUN_EMBEDDINGS),
                "--out",
                str(cat / RUN_SCORER),
                *TRAIN_FLAGS,
            ]
        )
    for name in (RUN_INDEX, RUN_SCORER):
        _link(run / name, cat / name)
    return run


def _user_file(work: Path, run: Path, n: int) -> Path:
    """The first n user ids of the run's interactions (file order), one per line."""
    import pyarrow.parquet as pq

    from llmrec.schema import INTERACTIONS_FILE, RUN_DATA, USER_ID

    f = work / f"users-{run.name}-{n}.txt"
    if not f.is_file():
        seen: dict[str, None] = {}
        pf = pq.ParquetFile(run / RUN_DATA / INTERACTIONS_FILE)
        for b in pf.iter_batches(columns=[USER_ID], batch_size=1 << 20):
            seen.update(dict.fromkeys(b.column(0).to_pylist()))
            if len(seen) >= n:
                break
        users = list(seen)[:n]
        if len(users) < n:
            raise ValueError(f"{run} has {len(users)} users, fewer than the {n} asked")
        f.write_text("\n".join(users) + "\n")
    return f


def stage_recommend(params: dict[str, Any], work: Path) -> dict[str, Any]:
    """`llmrec recommend --k 10` of params["users"] on params["run"], in this process -> users/s."""
    import pyarrow.parquet as pq

    out = Path(tempfile.mkdtemp(prefix="rec-", dir=work)) / "recs.parquet"
    t0 = time.perf_counter()
    _cli(["recommend", "--run", params["run"], "--users", params["users"], "--k", "10", "--out", str(out)])
    wall = time.perf_counter() - t0
    n_rows = pq.ParquetFile(out).metadata.num_rows
    assert n_rows == 10 * params["size"], (n_rows, params["size"])  # k rows for every user, none skipped
    out.unlink()
    return {
        "n_users": params["size"],
        "wall_s": round(wall, 1),
        "users_per_s": round(params["size"] / wall, 1),
        "items_per_s_per_core": round(params["size"] / wall / CORES, 1),  # users/s per core
        "n_rows": n_rows,
    }


STAGES: dict[str, Callable[[dict[str, Any], Path], dict[str, Any]]] = {
    "embed": stage_embed,
    "index": stage_index,
    "train": stage_train,
    "recommend": stage_recommend,
}
NO_RAY = {"index"}  # stages that start no Ray (the index build is one process): no ray.init in their child
LEGACY = {"embed": "llmrec/embed/ray_embed.py"}  # main's file of each stage's code path
SIZES = {  # default sizes per stage (--sizes sets every stage's, --stage-sizes one stage's)
    "embed": [10_000, 100_000, 1_000_000],
    "index": [100_000, 1_000_000],
    "train": [100_000, 1_000_000],
    "recommend": [10_000, 100_000],
}
INDEX_KINDS = ["flat", "hnsw", "IVF1024,PQ48"]


def _embed_inputs(work: Path, n: int, shards: int) -> str:
    """The items of a seeded synthetic catalog of n items in `shards` parquet files (reused across runs): the
    one file itself when shards == 1, else the folder."""
    from llmrec.data.synthetic import write_sharded

    d = work / f"syn-{n}-{shards}"
    if not (d / "synthetic.json").is_file():
        write_sharded(d, n_items=n, n_users=1000, n_events=1000, n_shards=shards, n_topics=16, seed=0)
    return str(d / "items" / "part-00000.parquet") if shards == 1 else str(d / "items")


# ------------------------------------------------------------------------------------------ report


def ratios(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per path: driver RSS and per-core throughput, largest size vs smallest; new vs old at each size."""
    out: dict[str, Any] = {}
    by_path: dict[str, list[dict]] = {}
    for r in rows:
        if "error" not in r:
            by_path.setdefault(r["path"], []).append(r)
    for path, rs in by_path.items():
        rs = sorted(rs, key=lambda r: r["size"])
        lo, hi = rs[0], rs[-1]
        out[path] = {
            "sizes": [lo["size"], hi["size"]],
            "driver_rss_growth": round(hi["driver_peak_rss_mib"] / lo["driver_peak_rss_mib"], 3),
            "per_core_throughput_vs_smallest": round(
                hi["items_per_s_per_core"] / lo["items_per_s_per_core"], 3
            ),
        }
        if "worker_peak_rss_mib" in lo:  # stages on Ray
            out[path]["worker_peak_rss_growth"] = round(
                hi["worker_peak_rss_mib"] / max(lo["worker_peak_rss_mib"], 1e-9), 3
            )
            out[path]["worker_peak_anon_growth"] = round(
                hi["worker_peak_anon_mib"] / max(lo["worker_peak_anon_mib"], 1e-9), 3
            )
    sizes = sorted({r["size"] for r in rows})
    for n in sizes:
        pair = {r["path"]: r for r in rows if r["size"] == n and "error" not in r}
        if "old" in pair and "new" in pair:
            out[f"new_vs_old@{n}"] = {
                "driver_peak_rss": round(
                    pair["new"]["driver_peak_rss_mib"] / pair["old"]["driver_peak_rss_mib"], 3
                ),
                "wall": round(pair["new"]["wall_s"] / pair["old"]["wall_s"], 3),
                "items_per_s": round(pair["new"]["items_per_s"] / pair["old"]["items_per_s"], 3),
            }
    return out


def parse_stage_sizes(specs: list[str], stages: list[str], sizes: list[int] | None) -> dict[str, list[int]]:
    """Sizes per stage: SIZES, or --sizes for every stage, then each `STAGE=N,N,...` of --stage-sizes.

    >>> parse_stage_sizes(["train=100000,1000000"], ["embed", "train"], [10])
    {'embed': [10], 'train': [100000, 1000000]}
    """
    out = {st: list(sizes) if sizes else list(SIZES[st]) for st in stages}
    for spec in specs:
        st, sep, ns = spec.partition("=")
        if not sep or st not in STAGES:
            raise ValueError(
                f"--stage-sizes takes STAGE=N,N,... with STAGE one of {sorted(STAGES)}; got {spec!r}"
            )
        try:
            out[st] = [int(n) for n in ns.split(",")]
        except ValueError:
            raise ValueError(f"--stage-sizes {spec!r}: sizes must be integers, comma-separated") from None
    return out


def _jobs(
    stage: str, n: int, sizes_of_stage: list[int], args: argparse.Namespace, work: Path
) -> list[tuple[str, dict, str | None]]:
    """(path label, stage params, extra PYTHONPATH) of each measurement of `stage` at size n (one of
    sizes_of_stage); inputs made here (cached under work). Recommend: every size draws its users from one
    run of max(sizes_of_stage) users."""
    if stage == "embed":
        from llmrec.embed.encoder import default_model_path

        model = _tiny_model(work) if args.model == "tiny" else default_model_path()
        legacy = _legacy_module(work, LEGACY[stage])
        jobs = []
        for path in args.paths.split(","):
            # "new-shards": the new code on the same size of catalog in 64 files (old needs one file)
            items = _embed_inputs(work, n, 64 if path == "new-shards" else 1)
            params = {"path": path, "items": items, "model": model, "size": n}
            jobs.append((path, params, str(legacy.parent) if path == "old" else None))
        return jobs
    if stage == "index":
        index_bench = _index_bench()
        data = index_bench.write_dataset(work / "index", n, TEXT_DIM, n_queries=1000, k=10)
        jobs = []
        for kind in args.index_kinds:
            if kind == "hnsw" and n > args.hnsw_max_items:
                logger.info("index: hnsw at %d items skipped (--hnsw-max-items %d)", n, args.hnsw_max_items)
                continue
            out = data / ("scale-index-" + kind.replace(",", "_"))
            params = {
                "kind": kind,
                "embeddings": str(data / "embeddings"),
                "out": str(out),
                "size": n,
                "data": str(data),
            }
            jobs.append((kind, params, None))
        return jobs
    if stage == "train":
        run = _events_run(work, n, max(1, n // EVENTS_PER_USER))
        out = Path(tempfile.mkdtemp(prefix="scorer-", dir=work)) / "scorer"
        params = {"run": str(run), "out": str(out), "size": n, "max_steps": args.train_max_steps}
        return [("new", params, None)]
    if stage == "recommend":
        run = _recommend_run(work, max(sizes_of_stage))
        return [("new", {"run": str(run), "users": str(_user_file(work, run, n)), "size": n}, None)]
    raise ValueError(f"unknown stage {stage!r}; this benchmark has {sorted(STAGES)}")


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "_child":
        stage, params, work = sys.argv[2], json.loads(sys.argv[3]), Path(sys.argv[4])
        logging.basicConfig(level=logging.WARNING)
        print(json.dumps(_child(stage, params, work)))
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stages", default="embed", help=f"comma list of {sorted(STAGES)}")
    p.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=None,
        help=f"sizes of every stage given (items / items / events / users); default per stage {SIZES}",
    )
    p.add_argument(
        "--stage-sizes",
        nargs="+",
        default=[],
        metavar="STAGE=N,N",
        help="sizes of one stage, e.g. train=100000,1000000 recommend=10000,100000 (over --sizes)",
    )
    p.add_argument(
        "--paths",
        default="old,new,new-shards",
        help="embed: old (main's code, one input file), new (one file), new-shards (64 files); the other "
        "stages run today's code only",
    )
    p.add_argument(
        "--model", default="tiny", help="embed: tiny (random-init 2x32 BERT) or minilm (the bundled model)"
    )
    p.add_argument(
        "--index-kinds",
        nargs="+",
        default=INDEX_KINDS,
        help=f"index: `llmrec index --kind` values, each its own run (default {INDEX_KINDS})",
    )
    p.add_argument(
        "--hnsw-max-items",
        type=int,
        default=100_000,
        help="index: build hnsw only up to this many items (default 100000; 1M takes over ~15 min here)",
    )
    p.add_argument(
        "--train-max-steps",
        type=int,
        default=None,
        help="train: batches of the one epoch at most (`llmrec train --max-steps`; default: the whole "
        "epoch), "
        "so that 1M-10M events measure the data path and a bounded fit",
    )
    p.add_argument("--work", default=None, help="folder for inputs and outputs (default: a temp folder)")
    p.add_argument("--timeout-s", type=float, default=1500, help="per measurement")
    p.add_argument("--out", default=None, help="write the JSON report here too (after every measurement)")
    args = p.parse_args(argv)
    from llmrec.log import setup_logging
    from llmrec.raysetup import local_env_defaults, ray_detail_to_log_files

    stages = args.stages.split(",")
    unknown = [st for st in stages if st not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; this benchmark has {sorted(STAGES)}")
    sizes = parse_stage_sizes(args.stage_sizes, stages, args.sizes)
    local_env_defaults()
    ray_detail_to_log_files()  # Ray Data's progress dumps to the session's log files
    setup_logging("INFO")
    work = Path(args.work or tempfile.mkdtemp(prefix="llmrec-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime()),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpus": os.cpu_count(), "ray_cpus": CORES, "loadavg_start": os.getloadavg()},
        "model": args.model,
    }

    def save(echo: bool = False) -> None:  # after every measurement: an interrupted run keeps its rows
        write_json_report(report, args.out, echo=echo)

    for stage in stages:
        rows: list[dict[str, Any]] = []
        report[stage] = {"runs": rows}
        for n in sizes[stage]:
            for path, params, extra in _jobs(stage, n, sizes[stage], args, work):
                logger.info("%s %s, size %d ...", stage, path, n)
                r = measure(stage, params, work, args.timeout_s, extra)
                r["loadavg_1m"] = round(os.getloadavg()[0], 1)
                if stage == "index" and "error" not in r:
                    r.update(_index_search(Path(params["data"]), Path(params["out"]), path))
                r.update(path=path, size=n)
                logger.info("%s", json.dumps(r))
                rows.append(r)
                save()
        report[stage]["ratios"] = ratios(rows)
    report["machine"]["loadavg_end"] = os.getloadavg()
    save(echo=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
