"""The `python -m jobs.<name>` entrypoints: same flags as the CLI, `--config` YAML expansion, exit codes,
and one real job run (prepare) checked against the library call it wraps."""

from __future__ import annotations

import argparse
import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from jobs._entry import config_to_argv, expand_config

REPO = Path(__file__).resolve().parents[1]
CLI_JOBS = {  # job module -> llmrec subcommand
    "prepare": "prepare",
    "embed_catalog": "embed",
    "build_index": "index",
    "train_scorer": "train",
    "evaluate": "evaluate",
    "pipeline": "pipeline",
    "learn": "learn",
    "tune_encoder": "tune-encoder",
    "recommend": "recommend",
}
FLAG_RE = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")


def _command_options(command: str) -> set[str]:
    mod = importlib.import_module(f"llmrec.commands.{command.replace('-', '_')}")
    p = argparse.ArgumentParser()
    mod.add_arguments(p)
    return {s for a in p._actions for s in a.option_strings if s.startswith("--")}


@pytest.mark.parametrize("job", sorted(CLI_JOBS))
def test_job_help_is_the_cli_help(job: str, capsys: pytest.CaptureFixture[str]) -> None:
    from llmrec.cli import main as cli_main

    mod = importlib.import_module(f"jobs.{job}")
    assert mod.COMMAND == CLI_JOBS[job]
    assert mod.main(["--help"]) == 0
    job_help = capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli_main([CLI_JOBS[job], "--help"])
    assert e.value.code == 0
    cli_help = capsys.readouterr().out
    assert job_help == cli_help
    missing = _command_options(CLI_JOBS[job]) - set(FLAG_RE.findall(job_help))
    assert not missing, f"options missing from --help: {sorted(missing)}"


def test_job_usage_error_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    from jobs import pipeline

    assert pipeline.main(["--dataset", "d", "--source", "s", "--out", "o", "--no-such-flag"]) == 2
    assert "--no-such-flag" in capsys.readouterr().err


def test_deploy_help_lists_its_options(capsys: pytest.CaptureFixture[str]) -> None:
    from jobs import deploy

    assert deploy.main(["--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--run", "--serve-config", "--app", "--set", "--http-host", "--http-port", "--hint"):
        assert flag in out, f"{flag} missing from jobs.deploy --help"


def test_config_to_argv_rules() -> None:
    cfg = {"dataset": "generic", "batch_size": 64, "force": True, "stages": ["embed", "index"], "model": None,
           "check": False, "--out": "runs/x"}
    assert config_to_argv(cfg) == ["--dataset", "generic", "--batch-size", "64", "--force",
                                   "--stages", "embed", "index", "--out", "runs/x"]
    with pytest.raises(ValueError, match="mapping"):
        config_to_argv({"embed": {"batch_size": 3}}, source="x.yaml")
    with pytest.raises(ValueError, match="flag names"):
        config_to_argv({3: "a"})


def test_config_false_turns_off_a_switch_that_is_on_by_default(tmp_path: Path) -> None:
    """`warm-start: false` in a job YAML reaches TrainConfig as False (dropped, it would stay on)."""
    import argparse

    from llmrec.cli import build_parser
    from llmrec.config import TrainConfig, config_from_args

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    train = sub.choices["train"]
    negatable = frozenset(s for a in train._actions for s in a.option_strings if s.startswith("--no-"))
    assert config_to_argv({"warm-start": False, "force": False}, negatable=negatable) == ["--no-warm-start"]
    cfg_file = tmp_path / "train.yaml"
    cfg_file.write_text("data: d\nembeddings: e\nout: o\nwarm-start: false\nuse-gpu: false\n"
                        "epochs: 3\n")
    argv = expand_config(["--config", str(cfg_file)], negatable)
    cfg = config_from_args(TrainConfig, train.parse_args(argv))
    assert cfg == TrainConfig(warm_start=False, use_gpu=False, epochs=3)


def test_config_file_then_command_line_wins(tmp_path: Path) -> None:
    from llmrec.cli import build_parser

    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text("dataset: movielens-latest-small\nsource: /data/ml\nout: /runs/a\nepochs: 3\n"
                   "force: true\n")
    argv = expand_config(["--out", "/runs/b", "--config", str(cfg), "--epochs", "5"])
    assert argv[: 2] == ["--dataset", "movielens-latest-small"]  # file first ...
    args = build_parser().parse_args(["pipeline", *argv])
    # ... and the command line wins
    assert (args.out, args.epochs, args.force, args.source) == ("/runs/b", 5, True, "/data/ml")
    assert expand_config([f"--config={cfg}"])[:2] == ["--dataset", "movielens-latest-small"]


def test_bad_config_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from jobs import pipeline

    assert pipeline.main(["--config", str(tmp_path / "nope.yaml")]) == 2
    assert "no such file" in capsys.readouterr().err
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n")
    assert pipeline.main(["--config", str(bad)]) == 2
    assert "expected a YAML mapping" in capsys.readouterr().err
    assert pipeline.main(["--config"]) == 2
    assert "--config needs a file" in capsys.readouterr().err


def _tiny_generic_source(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"item_id": [f"i{k}" for k in range(6)],
                  "text": [f"item number {k} about topic {k % 2}" for k in range(6)]}).to_csv(d / "items.csv",
                                                                                             index=False)
    rows = [(f"u{u}", f"i{(u + j) % 6}", 1000 + 10 * j) for u in range(4) for j in range(3)]
    pd.DataFrame(rows, columns=["user_id", "item_id", "ts"]).to_csv(d / "events.csv", index=False)
    return d


def test_prepare_job_equals_library_call(tmp_path: Path) -> None:
    """A real job run writes exactly what the library function writes for the same inputs."""
    from jobs import prepare as prepare_job
    from llmrec.data.prepare import prepare
    from llmrec.data.tables import read_interactions, read_items

    src = _tiny_generic_source(tmp_path / "raw")
    flags = {"items": "items.csv", "interactions": "events.csv"}
    rc = prepare_job.main(["--dataset", "generic", "--source", str(src), "--out", str(tmp_path / "job"),
                           *config_to_argv(flags)])
    assert rc == 0
    prepare("generic", str(src), str(tmp_path / "lib"), **flags)
    for read in (read_items, read_interactions):
        pd.testing.assert_frame_equal(read(tmp_path / "job"), read(tmp_path / "lib"))
    meta = json.loads((tmp_path / "job" / "meta.json").read_text())
    assert meta["stage"] == "prepare" and meta["n_items"] == 6 and meta["n_interactions"] == 12


def test_job_runs_as_module_and_reports_bad_input(tmp_path: Path) -> None:
    """`python -m jobs.prepare` (what `ray job submit` runs): bad input -> exit 2 and one clear line."""
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.prepare", "--dataset", "generic", "--source", str(tmp_path / "missing"),
         "--out", str(tmp_path / "o"), "--items", "items.csv"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "llmrec prepare: error:" in proc.stderr and "Traceback" not in proc.stderr
