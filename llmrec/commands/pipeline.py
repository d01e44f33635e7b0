"""`llmrec pipeline`: every stage in order (prepare -> embed -> index -> train -> evaluate) into one run folder.

Each stage is the same code path as its own subcommand (the pipeline calls them with the flags it prints), so
what the pipeline does can always be repeated stage by stage. A stage whose artifact already exists and was made
from the same flags and the same upstream artifacts is reused, not recomputed (`--force` recomputes): re-running the
pipeline is idempotent and resumes after a failed stage.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import time
from pathlib import Path

from llmrec import schema
from llmrec.artifacts import file_fingerprint, read_meta

logger = logging.getLogger(__name__)

HELP = "run every stage (prepare, embed, index, train, evaluate) on one dataset into a run folder"
STAGES = ("prepare", "embed", "index", "train", "evaluate")
STATE_FILE = "pipeline.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, help="dataset adapter name, e.g. movielens-latest-small")
    p.add_argument("--source", required=True, help="folder with the raw dataset files")
    p.add_argument("--out", required=True, help="run folder; stages write data/, embeddings/, index/, scorer/, eval/")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma list, subset of {','.join(STAGES)}")
    p.add_argument("--model", default=None, help="encoder: local HF dir or hub name (default: bundled MiniLM-L6)")
    p.add_argument("--batch-size", type=int, default=None, help="embed batch size (default: embed's)")
    p.add_argument("--index-kind", default="auto", help="auto|flat|hnsw|ivf|torch")
    p.add_argument("--num-workers", type=int, default=None, help="Ray Train workers (default: train's)")
    p.add_argument("--epochs", type=int, default=5, help="training epochs, also for the models evaluate retrains (default 5: ~6 min per fit on 2 CPU cores for MovieLens)")
    p.add_argument("--max-test-users", type=int, default=None, help="cap evaluated users per protocol")
    p.add_argument("--address", default=None, help="Ray cluster address (default: embedded local Ray)")
    p.add_argument("--force", action="store_true", help="recompute stages even when their artifact is current")


def stage_argv(args: argparse.Namespace, run: Path) -> dict[str, list[str]]:
    """The exact subcommand argv each stage runs with."""

    def opt(flag: str, value: object) -> list[str]:
        return [] if value is None else [flag, str(value)]

    data, emb = run / schema.RUN_DATA, run / schema.RUN_EMBEDDINGS
    return {
        "prepare": ["prepare", "--dataset", args.dataset, "--source", str(args.source), "--out", str(data)],
        "embed": ["embed", "--items", str(data), "--out", str(emb)]
        + opt("--model", args.model) + opt("--batch-size", args.batch_size) + opt("--address", args.address),
        "index": ["index", "--embeddings", str(emb), "--out", str(run / schema.RUN_INDEX),
                  "--kind", args.index_kind, "--check"],
        "train": ["train", "--data", str(data), "--embeddings", str(emb), "--out", str(run / schema.RUN_SCORER)]
        + opt("--num-workers", args.num_workers) + opt("--epochs", args.epochs),
        "evaluate": ["evaluate", "--data", str(data), "--run", str(run), "--out", str(run / schema.RUN_EVAL)]
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

    run_dir = Path(args.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    wanted = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(wanted) - set(STAGES))
    if unknown:
        raise ValueError(f"--stages: unknown stage(s) {unknown}; valid stages are {list(STAGES)}")
    argvs = stage_argv(args, run_dir)
    state_path = run_dir / STATE_FILE
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    t_all = time.perf_counter()
    summary = []
    for stage in STAGES:
        if stage not in wanted:
            continue
        key = {"argv": argvs[stage], "upstream": {u: _meta_digest(run_dir, u) for u in UPSTREAM[stage]}}
        out_dir = run_dir / STAGE_DIR[stage]
        if not args.force and state.get(stage) == key and _meta_digest(run_dir, stage) is not None:
            logger.info("[%s] reusing %s (same flags and inputs; --force recomputes)", stage, out_dir)
            summary.append((stage, "reused", 0.0, out_dir))
            continue
        cmd = "llmrec " + " ".join(shlex.quote(a) for a in argvs[stage])
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
        tmp = state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        os.replace(tmp, state_path)
        summary.append((stage, "done", dt, out_dir))
    total = time.perf_counter() - t_all
    lines = [f"pipeline finished in {total:.1f}s; artifacts in {run_dir}:"]
    lines += [f"  {s:<9} {how:<7} {dt:7.1f}s  {d}" for s, how, dt, d in summary]
    metrics = run_dir / schema.RUN_EVAL / "report.md"
    if metrics.is_file():
        lines.append(f"  evaluation report: {metrics}")
    print("\n".join(lines))
    return 0


def _meta_digest(run_dir: Path, stage: str) -> str | None:
    """Digest of a stage's meta.json (it changes whenever the stage rewrites its artifact), None if absent."""
    art = run_dir / STAGE_DIR[stage]
    try:
        read_meta(art)
    except (ValueError, OSError):
        return None
    return file_fingerprint([art / schema.META_FILE])
