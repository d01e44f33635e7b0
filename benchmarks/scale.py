"""Scale benchmark: driver peak RSS, wall time and worker memory of each batch stage at growing sizes.

Every measurement runs in a fresh child process (`_child`) that starts its own local Ray, runs one stage
function once and reports: the driver's peak RSS (VmHWM of the child itself), the stage's wall time, and the
Ray worker processes' memory (peak RSS of the largest worker and of all workers together, sampled every
0.25 s from the raylet's children). The parent prepares the inputs, runs the children one at a time, and
prints
one JSON report with ratios: each size against the smallest (driver RSS growth, throughput per core) and the
new code path against today's (`main`'s) in the same run.

Stages are functions `stage_<name>(params, work) -> dict` registered in STAGES; another stage (index, train,
recommend) plugs in the same way and gets the same harness. Today's code path of a stage is its file on the
`main` branch (`git show main:<path>`), loaded as a module of its own, so both run on the same machine in the
same run.

Embed (the only stage here so far): `llmrec embed` of synthetic catalogs (`llmrec.data.synthetic
.write_sharded`, one parquet file, so both paths read the same input) with a tiny random-init BERT (2 layers,
32-d, MiniLM's tokenizer: the encoder is not the bottleneck), batch 128, max 128 tokens, default actors.

    .venv/bin/python benchmarks/scale.py --stages embed --sizes 10000 100000 1000000 --out scale.json
    .venv/bin/python benchmarks/scale.py --stages embed --sizes 100000 --model minilm --paths new
"""

from __future__ import annotations

import argparse
import importlib
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
    """Run one stage in this (fresh) process on its own local Ray; add driver and worker memory."""
    import ray

    from llmrec.raysetup import init_ray, local_env_defaults

    local_env_defaults()
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


STAGES: dict[str, Callable[[dict[str, Any], Path], dict[str, Any]]] = {"embed": stage_embed}
LEGACY = {"embed": "llmrec/embed/ray_embed.py"}  # main's file of each stage's code path


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
            "worker_peak_rss_growth": round(
                hi["worker_peak_rss_mib"] / max(lo["worker_peak_rss_mib"], 1e-9), 3
            ),
            "worker_peak_anon_growth": round(
                hi["worker_peak_anon_mib"] / max(lo["worker_peak_anon_mib"], 1e-9), 3
            ),
        }
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


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "_child":
        stage, params, work = sys.argv[2], json.loads(sys.argv[3]), Path(sys.argv[4])
        logging.basicConfig(level=logging.WARNING)
        print(json.dumps(_child(stage, params, work)))
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stages", default="embed", help=f"comma list of {sorted(STAGES)}")
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument(
        "--paths",
        default="old,new,new-shards",
        help="old (main's code, one input file), new (one file), new-shards (64 files)",
    )
    p.add_argument(
        "--model", default="tiny", help="tiny (random-init 2x32 BERT) or minilm (the bundled model)"
    )
    p.add_argument("--work", default=None, help="folder for inputs and outputs (default: a temp folder)")
    p.add_argument("--timeout-s", type=float, default=1500, help="per measurement")
    p.add_argument("--out", default=None, help="write the JSON report here too")
    args = p.parse_args(argv)
    from llmrec.log import setup_logging
    from llmrec.raysetup import local_env_defaults

    local_env_defaults()
    setup_logging("INFO")
    work = Path(args.work or tempfile.mkdtemp(prefix="llmrec-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime()),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpus": os.cpu_count(), "ray_cpus": CORES, "loadavg_start": os.getloadavg()},
        "model": args.model,
    }
    for stage in args.stages.split(","):
        if stage != "embed":
            raise ValueError(f"unknown stage {stage!r}; this benchmark has {sorted(STAGES)}")
        from llmrec.embed.encoder import default_model_path

        model = _tiny_model(work) if args.model == "tiny" else default_model_path()
        legacy = _legacy_module(work, LEGACY[stage])
        rows = []
        for n in args.sizes:
            for path in args.paths.split(","):
                # "new-shards": the new code on the same size of catalog in 64 files (old needs one file)
                items = _embed_inputs(work, n, 64 if path == "new-shards" else 1)
                params = {"path": path, "items": items, "model": model, "size": n}
                logger.info("%s %s path, %d items ...", stage, path, n)
                r = measure(
                    stage, params, work, args.timeout_s, str(legacy.parent) if path == "old" else None
                )
                r.update(path=path, size=n)
                logger.info("%s", json.dumps(r))
                rows.append(r)
        report[stage] = {"runs": rows, "ratios": ratios(rows)}
    report["machine"]["loadavg_end"] = os.getloadavg()
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
