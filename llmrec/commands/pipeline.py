"""`llmrec pipeline`: every stage in order (prepare -> embed -> index -> train -> evaluate) into one run folder.

Each stage is the same code path as its own subcommand (the pipeline calls them with the flags it prints), so
what the pipeline does can always be repeated stage by stage. A stage whose artifact already exists and was made
from the same flags and the same upstream artifacts is reused, not recomputed (`--force` recomputes): re-running the
pipeline is idempotent and resumes after a failed stage. `--out` may be a URI (s3://bucket/run, gs://...):
each stage then stages its inputs in and uploads its artifact (llmrec.storage), and pipeline.json and the
meta.json digests of the reuse check are read and written there too.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shlex
import time
from pathlib import Path

from llmrec import schema, storage

logger = logging.getLogger(__name__)

HELP = "run every stage (prepare, embed, index, train, evaluate) on one dataset into a run folder"
STAGES = ("prepare", "embed", "index", "train", "evaluate")
STATE_FILE = "pipeline.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, help="dataset adapter name, e.g. movielens-latest-small")
    p.add_argument("--source", required=True, help="folder with the raw dataset files")
    p.add_argument("--out", required=True, help="run folder or URI (s3://bucket/run); stages write data/, "
                   "embeddings/, index/, scorer/, eval/")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma list, subset of {','.join(STAGES)}")
    p.add_argument("--model", default=None, help="encoder: local HF dir or hub name (default: bundled MiniLM-L6)")
    p.add_argument("--batch-size", type=int, default=None, help="embed batch size (default: embed's)")
    p.add_argument("--index-kind", default="auto",
                   help="auto|flat|hnsw|ivf|torch or a FAISS index_factory string, e.g. IVF4096,SQ8")
    p.add_argument("--num-workers", type=int, default=None, help="Ray Train workers (default: train's)")
    p.add_argument("--epochs", type=int, default=5, help="training epochs, also for the models evaluate retrains (default 5: ~6 min per fit on 2 CPU cores for MovieLens)")
    p.add_argument("--max-test-users", type=int, default=None, help="cap evaluated users per protocol")
    p.add_argument("--address", default=None, help="Ray cluster address (default: embedded local Ray)")
    p.add_argument("--force", action="store_true", help="recompute stages even when their artifact is current")


def stage_argv(args: argparse.Namespace, run: str | Path) -> dict[str, list[str]]:
    """The exact subcommand argv each stage runs with (`run`: a local folder or a URI)."""

    def opt(flag: str, value: object) -> list[str]:
        return [] if value is None else [flag, str(value)]

    def sub(name: str) -> str:
        return storage.join(run, name)

    data, emb = sub(schema.RUN_DATA), sub(schema.RUN_EMBEDDINGS)
    return {
        "prepare": ["prepare", "--dataset", args.dataset, "--source", str(args.source), "--out", data],
        "embed": ["embed", "--items", data, "--out", emb]
        + opt("--model", args.model) + opt("--batch-size", args.batch_size) + opt("--address", args.address),
        "index": ["index", "--embeddings", emb, "--out", sub(schema.RUN_INDEX),
                  "--kind", args.index_kind, "--check"],
        "train": ["train", "--data", data, "--embeddings", emb, "--out", sub(schema.RUN_SCORER)]
        + opt("--num-workers", args.num_workers) + opt("--epochs", args.epochs),
        "evaluate": ["evaluate", "--data", data, "--run", str(run), "--out", sub(schema.RUN_EVAL)]
        + opt("--max-test-users", args.max_test_users),
    }


STAGE_DIR = {
    "prepare": schema.RUN_DATA,
    "embed": schema.RUN_EMBEDDINGS,
    "index": schema.RUN_INDEX,
    "train": schema.RUN_SCORER,
    "evaluate": schema.RUN_EVAL,
}
UPSTREAM = {"prepare": (), "embed": ("prepare",), "index": ("embed",), "train": ("prepare", "embed"),
            "evaluate": ("prepare", "embed", "train")}


def run(args: argparse.Namespace) -> int:
    from llmrec.cli import main as cli_main

    run_dir: str | Path = args.out if storage.is_uri(args.out) else Path(args.out)
    if isinstance(run_dir, Path):
        run_dir.mkdir(parents=True, exist_ok=True)
    wanted = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(wanted) - set(STAGES))
    if unknown:
        raise ValueError(f"--stages: unknown stage(s) {unknown}; valid stages are {list(STAGES)}")
    argvs = stage_argv(args, run_dir)
    state_path = storage.join(run_dir, STATE_FILE)
    state = json.loads(storage.read_bytes(state_path)) if storage.exists(state_path) else {}
    t_all = time.perf_counter()
    summary = []
    for stage in STAGES:
        if stage not in wanted:
            continue
        key = {"argv": argvs[stage], "upstream": {u: _meta_digest(run_dir, u) for u in UPSTREAM[stage]}}
        out_dir = storage.join(run_dir, STAGE_DIR[stage])
        if not args.force and state.get(stage) == key and _meta_digest(run_dir, stage) is not None:
            logger.info("[%s] reusing %s (same flags and inputs; --force recomputes)", stage,
                        storage.redact(out_dir))
            summary.append((stage, "reused", 0.0, out_dir))
            continue
        cmd = "llmrec " + " ".join(shlex.quote(storage.redact(a)) for a in argvs[stage])
        logger.info("[%s] %s", stage, cmd)
        t0 = time.perf_counter()
        rc = cli_main(["--log-level", logging.getLevelName(logging.getLogger().level), *argvs[stage]])
        dt = time.perf_counter() - t0
        if rc != 0:
            logger.error("[%s] failed (exit %d) after %.1fs; fix the error above and re-run (finished stages are "
                         "reused)", stage, rc, dt)
            return rc
        key["upstream"] = {u: _meta_digest(run_dir, u) for u in UPSTREAM[stage]}
        state[stage] = key
        storage.write_bytes(state_path, json.dumps(state, indent=2).encode())  # local: atomic rename
        summary.append((stage, "done", dt, out_dir))
    total = time.perf_counter() - t_all
    lines = [f"pipeline finished in {total:.1f}s; artifacts in {storage.redact(run_dir)}:"]
    lines += [f"  {s:<9} {how:<7} {dt:7.1f}s  {storage.redact(d)}" for s, how, dt, d in summary]
    metrics = storage.join(run_dir, schema.RUN_EVAL, "report.md")
    if storage.exists(metrics):
        lines.append(f"  evaluation report: {storage.redact(metrics)}")
    print("\n".join(lines))
    return 0


def _meta_digest(run_dir: str | Path, stage: str) -> str | None:
    """Digest of a stage's meta.json (it changes whenever the stage rewrites its artifact), None if absent.

    The same value as `llmrec.artifacts.file_fingerprint([meta.json])`, for a local folder or a URI.
    """
    try:
        raw = storage.read_bytes(storage.join(run_dir, STAGE_DIR[stage], schema.META_FILE))
        if json.loads(raw).get("schema_version") != schema.SCHEMA_VERSION:
            return None
    except (ValueError, OSError):
        return None
    return hashlib.sha256(raw).hexdigest()[:16]
