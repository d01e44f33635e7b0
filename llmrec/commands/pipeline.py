"""`llmrec pipeline`: every stage in order (prepare -> [tune-encoder] -> embed -> index -> train -> evaluate)
into one run folder.

By default the scorer is trained on the leave-last-out training split (`llmrec train --holdout loo`) and the
evaluation is `llmrec evaluate --fast`: leave-last-out only, llmrec against the strongest tuned baselines
and the hybrids, and llmrec's row is that very scorer (no second training), so what `make run` evaluates is
what it serves; the run ends by printing the results table. `--train-holdout none` trains on every event (the
evaluation then trains llmrec once more on the split), `--eval full` runs the reviewer-grade evaluation
(every protocol, model and 3 seeds; `make eval`). `--tune-encoder` first fine-tunes the encoder on the run's
leave-last-out training events (`llmrec tune-encoder` -> RUN/encoder, issue 14's first lever) and embeds with
it; it allows only `--eval fast`.

Each stage is the same code path as its own subcommand (the pipeline calls them with the flags it prints), so
what the pipeline does can always be repeated stage by stage. A stage whose artifact already exists and was
made from the same flags and the same upstream artifacts is reused, not recomputed (`--force` recomputes):
re-running the pipeline is idempotent and resumes after a failed stage. "The same" compares inputs, not their
spelling (`same_inputs`): the run folder relative or absolute is one folder, and a local `--source` is
compared by the content of the files prepare read (sha256 against the `fingerprint` in RUN/data/meta.json), so
the same data under another path is reused and edited data is prepared again. `--out` may be a URI
(s3://bucket/run, gs://...): each stage then stages its inputs in and uploads its artifact (llmrec.storage),
and pipeline.json and the meta.json digests of the reuse check are read and written there too.
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
from llmrec.config import COLD_CHOICE_KINDS, EmbedConfig, TrainConfig, with_overrides

logger = logging.getLogger(__name__)

HELP = "run every stage (prepare, embed, index, train, evaluate) on one dataset into a run folder"
STAGES = ("prepare", "tune-encoder", "embed", "index", "train", "evaluate")
OPTIONAL_STAGES = ("tune-encoder",)  # run only when asked for (`--tune-encoder`)
STATE_FILE = "pipeline.json"
# the pipeline's training: TrainConfig with fewer epochs (~6 min per fit on 2 CPU cores for MovieLens); its
# --epochs / --num-workers reach `llmrec train` as flags, checked here first (before any stage runs)
PIPELINE_TRAIN = TrainConfig(epochs=5)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, help="dataset adapter name, e.g. movielens-latest-small")
    p.add_argument("--source", required=True, help="folder with the raw dataset files")
    p.add_argument("--out", required=True, help="run folder or URI (s3://bucket/run); stages write data/, "
                   "embeddings/, index/, scorer/, eval/")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma list, subset of {','.join(STAGES)}")
    p.add_argument(
        "--model", default=None, help="encoder: local HF dir or hub name (default: bundled MiniLM-L6)"
    )
    p.add_argument("--batch-size", type=int, default=None, help="embed batch size (default: embed's)")
    p.add_argument("--index-kind", default="auto",
                   help="auto|flat|hnsw|ivf|torch or a FAISS index_factory string, e.g. IVF4096,SQ8")
    p.add_argument("--num-workers", type=int, default=None, help="Ray Train workers (default: train's)")
    p.add_argument("--epochs", type=int, default=PIPELINE_TRAIN.epochs,
                   help="training epochs, also for the models evaluate retrains (default "
                   f"{PIPELINE_TRAIN.epochs}: ~6 min per fit on 2 CPU cores for MovieLens)")
    p.add_argument("--cold-choice", choices=COLD_CHOICE_KINDS, default=None,
                   help="how the scorer chooses its cold-item settings (`llmrec train --cold-choice`; "
                   f"default {PIPELINE_TRAIN.cold_choice}; held-out-new about doubles the train stage)")
    p.add_argument("--max-test-users", type=int, default=None, help="cap evaluated users per protocol")
    p.add_argument("--train-holdout", choices=["loo", "none"], default="loo",
                   help="loo (default): train the scorer on the leave-last-out split the evaluation scores "
                   "it on; none: on every event")
    p.add_argument("--eval", choices=["fast", "default", "full"], default="fast",
                   help="evaluation preset (llmrec evaluate --fast / no preset / --full; default fast)")
    p.add_argument("--tune-encoder", action="store_true",
                   help="fine-tune the encoder's top layers on the run's leave-last-out training events "
                   "first (`llmrec tune-encoder` -> RUN/encoder) and embed with it; only `--eval fast` then "
                   "(the other protocols and seeds would score events the encoder learnt from)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: embedded local Ray)")
    p.add_argument(
        "--force", action="store_true", help="recompute stages even when their artifact is current"
    )


def stage_argv(args: argparse.Namespace, run: str | Path) -> dict[str, list[str]]:
    """The exact subcommand argv each stage runs with (`run`: a local folder or a URI)."""

    def opt(flag: str, value: object) -> list[str]:
        return [] if value is None else [flag, str(value)]

    def sub(name: str) -> str:
        return storage.join(run, name)

    data, emb, enc = sub(schema.RUN_DATA), sub(schema.RUN_EMBEDDINGS), sub(schema.RUN_ENCODER)
    tuned = bool(getattr(args, "tune_encoder", False))
    return {
        "prepare": ["prepare", "--dataset", args.dataset, "--source", str(args.source), "--out", data],
        "tune-encoder": ["tune-encoder", "--data", data, "--out", enc]
        + opt("--model", args.model) + opt("--address", args.address),
        "embed": ["embed", "--items", data, "--out", emb]
        + opt("--model", enc if tuned else args.model) + opt("--batch-size", args.batch_size)
        + opt("--address", args.address),
        "index": ["index", "--embeddings", emb, "--out", sub(schema.RUN_INDEX),
                  "--kind", args.index_kind, "--check"],
        "train": ["train", "--data", data, "--embeddings", emb, "--out", sub(schema.RUN_SCORER)]
        + opt("--num-workers", args.num_workers) + opt("--epochs", args.epochs)
        + opt("--cold-choice", getattr(args, "cold_choice", None))
        + (["--holdout", "loo"] if getattr(args, "train_holdout", "loo") == "loo" else []),
        "evaluate": ["evaluate", "--data", data, "--run", str(run), "--out", sub(schema.RUN_EVAL)]
        + opt("--max-test-users", args.max_test_users)
        + {"fast": ["--fast"], "full": ["--full"], "default": []}[getattr(args, "eval", "fast")],
    }


STAGE_DIR = {
    "prepare": schema.RUN_DATA,
    "tune-encoder": schema.RUN_ENCODER,
    "embed": schema.RUN_EMBEDDINGS,
    "index": schema.RUN_INDEX,
    "train": schema.RUN_SCORER,
    "evaluate": schema.RUN_EVAL,
}
UPSTREAM = {"prepare": (), "tune-encoder": ("prepare",), "embed": ("prepare",), "index": ("embed",),
            "train": ("prepare", "embed"), "evaluate": ("prepare", "embed", "train")}


def upstream(stage: str, tuned: bool) -> tuple[str, ...]:
    """The stages whose artifacts `stage` reads: embed also reads the tuned encoder with --tune-encoder (runs
    without it keep the key they always had, so their stages stay reusable)."""
    return UPSTREAM[stage] + (("tune-encoder",) if tuned and stage == "embed" else ())


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of the train stage: PIPELINE_TRAIN with this pipeline's --epochs, --num-workers and
    --cold-choice."""
    given = {"epochs": args.epochs, "num_workers": getattr(args, "num_workers", None),
             "cold_choice": getattr(args, "cold_choice", None)}
    given = {k: v for k, v in given.items() if v is not None}
    return with_overrides(PIPELINE_TRAIN, given, "llmrec pipeline")


def embed_config(args: argparse.Namespace) -> EmbedConfig:
    """The EmbedConfig of the embed stage: EmbedConfig() with this pipeline's --model and --batch-size."""
    given = {"model": getattr(args, "model", None), "batch_size": getattr(args, "batch_size", None)}
    return with_overrides(EmbedConfig(), {k: v for k, v in given.items() if v is not None}, "llmrec pipeline")


def run(args: argparse.Namespace) -> int:
    from llmrec.cli import main as cli_main

    run_dir: str | Path = args.out if storage.is_uri(args.out) else Path(args.out)
    if isinstance(run_dir, Path):
        run_dir.mkdir(parents=True, exist_ok=True)
    wanted = [s.strip() for s in args.stages.split(",") if s.strip()]
    embed_config(args)  # a bad --batch-size fails now, not after prepare
    train_config(args)  # a bad --epochs / --num-workers fails now, not after prepare and embed
    unknown = sorted(set(wanted) - set(STAGES))
    if unknown:
        raise ValueError(f"--stages: unknown stage(s) {unknown}; valid stages are {list(STAGES)}")
    tuned = bool(getattr(args, "tune_encoder", False))
    if tuned and getattr(args, "eval", "fast") != "fast" and "evaluate" in wanted:
        raise ValueError(f"--tune-encoder evaluates only with --eval fast (loo, one seed), got --eval "
                         f"{args.eval}: the encoder learnt from events other protocols and seeds hold out")
    if not tuned:
        wanted = [s for s in wanted if s not in OPTIONAL_STAGES]
    argvs = stage_argv(args, run_dir)
    state_path = storage.join(run_dir, STATE_FILE)
    state = json.loads(storage.read_bytes(state_path)) if storage.exists(state_path) else {}
    t_all = time.perf_counter()
    summary = []
    for stage in STAGES:
        if stage not in wanted:
            continue
        ups = upstream(stage, tuned)
        key = {"argv": argvs[stage], "upstream": {u: _meta_digest(run_dir, u) for u in ups}}
        out_dir = storage.join(run_dir, STAGE_DIR[stage])
        if not args.force and same_inputs(stage, state.get(stage), key, run_dir):
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
            logger.error("[%s] failed (exit %d) after %.1fs; fix the error above and re-run "
                         "(finished stages are reused)", stage, rc, dt)
            return rc
        key["upstream"] = {u: _meta_digest(run_dir, u) for u in ups}
        state[stage] = key
        storage.write_bytes(state_path, json.dumps(state, indent=2).encode())  # local: atomic rename
        summary.append((stage, "done", dt, out_dir))
    total = time.perf_counter() - t_all
    lines = [f"pipeline finished in {total:.1f}s; artifacts in {storage.redact(run_dir)}:"]
    lines += [f"  {s:<9} {how:<7} {dt:7.1f}s  {storage.redact(d)}" for s, how, dt, d in summary]
    metrics = storage.join(run_dir, schema.RUN_EVAL, "report.md")
    if storage.exists(metrics):
        lines.append(f"  evaluation report: {storage.redact(metrics)}")
    results = storage.join(run_dir, schema.RUN_EVAL, "metrics.json")
    if "evaluate" in wanted and storage.exists(results):
        from llmrec.eval.report import results_table

        lines += ["", "Results (NDCG@10, full ranking; " + storage.redact(results) + "):",
                  results_table(json.loads(storage.read_bytes(results)))]
    print("\n".join(lines))
    return 0


def same_inputs(stage: str, done: dict | None, key: dict, run_dir: str | Path) -> bool:
    """Whether `stage`'s artifact in `run_dir`, made per pipeline.json entry `done`, is current for `key`.

    Current means: the artifact exists (its meta.json has this schema version), the upstream meta.json digests
    are equal, and the argv are equal after `normalised_argv` (the run folder however spelled; local paths by
    what they point to); for prepare a local `--source` is compared by content instead (`source_unchanged`).
    """
    if not done or _meta_digest(run_dir, stage) is None or done.get("upstream") != key["upstream"]:
        return False
    old, new = done.get("argv") or [], key["argv"]
    if normalised_argv(old) != normalised_argv(new):
        return False
    return stage != "prepare" or source_unchanged(_flag(new, "--source"), run_dir)


def _flag(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv and argv.index(flag) + 1 < len(argv) else None


PATH_FLAGS = ("--source", "--out", "--items", "--embeddings", "--data", "--run", "--model")  # in stage_argv


def normalised_argv(argv: list[str]) -> list[str]:
    """A stage argv as the reuse check compares it.

    The run folder (the parent of the stage's `--out`) becomes `RUN` in every value, whether it was relative,
    absolute or a URI; other local paths become absolute; prepare's local `--source` becomes `<source>` (its
    content is compared by `source_unchanged`). Example: `["index", "--embeddings", "runs/ml/embeddings",
    "--out", "/abs/runs/ml/index"]` (with cwd /abs) -> `["index", "--embeddings", "RUN/embeddings", "--out",
    "RUN/index"]`.
    """
    out = _flag(argv, "--out")
    if out is None:
        return list(argv)
    run = out.rstrip("/").rsplit("/", 1)[0] if "/" in out.rstrip("/") else "."
    run_abs = None if storage.is_uri(run) else Path(run).expanduser().resolve()
    norm: list[str] = []
    for i, v in enumerate(argv):
        flag = argv[i - 1] if i else ""
        if v.startswith("--") or flag not in PATH_FLAGS:
            norm.append(v)
        elif flag == "--source" and argv[0] == "prepare" and not storage.is_uri(v):
            norm.append("<source>")
        elif storage.is_uri(v) or run_abs is None:
            norm.append("RUN" + v[len(run):] if v == run or v.startswith(run + "/") else v)
        elif Path(v).expanduser().exists() or (flag != "--model" and "/" in v):  # a hub name stays as is
            p = Path(v).expanduser().resolve()
            norm.append("RUN" + ("/" + p.relative_to(run_abs).as_posix() if p != run_abs else "")
                        if p == run_abs or run_abs in p.parents else str(p))
        else:
            norm.append(v)
    return norm


def source_unchanged(source: str | None, run_dir: str | Path) -> bool:
    """A local raw-data folder still holds the bytes RUN/data was prepared from: the sha256 of the files
    prepare read (`files` in RUN/data/meta.json, inside `source`) equals the recorded `fingerprint`.

    A URI source is not read here: its `--source` text is compared instead (normalised_argv keeps it).
    """
    if source is None or storage.is_uri(source):
        return source is not None
    from llmrec.artifacts import file_fingerprint

    try:
        meta = json.loads(storage.read_bytes(storage.join(run_dir, STAGE_DIR["prepare"], schema.META_FILE)))
    except (ValueError, OSError):
        return False
    files, recorded = meta.get("files"), meta.get("fingerprint")
    if not files or not recorded:
        return False
    paths = [Path(source) / name for name in files]
    if not all(p.is_file() for p in paths):
        logger.info("[prepare] %s lacks %s (read by the previous prepare): preparing again", source,
                    [p.name for p in paths if not p.is_file()])
        return False
    same = file_fingerprint(paths) == recorded
    if not same:
        logger.info("[prepare] the files in %s changed since RUN/data was prepared: preparing again", source)
    return same


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
