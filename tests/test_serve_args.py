"""build_app args that pick the state shards' base (the run's users): default, opt-out, hot-swap knob."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from llmrec import schema
from llmrec.artifacts import write_meta
from llmrec.data.tables import write_interactions
from llmrec.serve.app import _parse_args


def make_run(run: Path, with_interactions: bool = True) -> Path:
    for sub in (schema.RUN_EMBEDDINGS, schema.RUN_INDEX):
        write_meta(run / sub, sub)
    if with_interactions:
        (run / schema.RUN_DATA).mkdir(parents=True)
        write_interactions(pd.DataFrame({schema.USER_ID: ["u"], schema.ITEM_ID: ["i"],
                                         schema.TS: np.array([1], np.int64), schema.RATING: [np.nan],
                                         schema.EVENT: ["like"]}), run / schema.RUN_DATA)
    return run


def test_data_dir_defaults_to_run_data_and_can_be_turned_off(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    data = str((run / schema.RUN_DATA).resolve())
    assert _parse_args({"run_dir": str(run)})["data_dir"] == data
    assert _parse_args({"run_dir": str(run), "load_run_users": "false"})["data_dir"] is None
    other = make_run(tmp_path / "other") / schema.RUN_DATA
    assert _parse_args({"run_dir": str(run), "data_dir": str(other)})["data_dir"] == str(other.resolve())
    # user_config.data_dir (the hot-swap knob) wins, also over load_run_users=false; null = no base
    cfg = {"run_dir": str(run), "load_run_users": False, "user_config": {"data_dir": str(other)}}
    assert _parse_args(cfg)["data_dir"] == str(other.resolve())
    assert _parse_args({"run_dir": str(run), "user_config": {"data_dir": None}})["data_dir"] is None
    bare = make_run(tmp_path / "bare", with_interactions=False)
    assert _parse_args({"run_dir": str(bare)})["data_dir"] is None  # nothing to load: start empty


def test_bad_data_dir_args_say_what_to_do(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    with pytest.raises(ValueError, match="has no interactions.parquet; pass a prepared data folder"):
        _parse_args({"run_dir": str(run), "data_dir": str(tmp_path)})
    with pytest.raises(ValueError, match="data_dir and load_run_users=false contradict"):
        _parse_args({"run_dir": str(run), "data_dir": str(run / "data"), "load_run_users": False})
    with pytest.raises(ValueError, match="load_run_users must be true or false, got 'maybe'"):
        _parse_args({"run_dir": str(run), "load_run_users": "maybe"})


def test_auth_token_comes_from_a_file_or_the_environment_never_argv(tmp_path: Path) -> None:
    import argparse

    from llmrec.commands import serve as serve_cmd
    from llmrec.serve.auth import read_token

    f = tmp_path / "token"
    f.write_text("  tok-1\n")
    assert read_token(str(f), {"LLMREC_AUTH_TOKEN": "tok-2"}) == "tok-1"  # the file wins
    assert read_token(None, {"LLMREC_AUTH_TOKEN": "tok-2"}) == "tok-2"
    assert read_token(None, {}) is None
    with pytest.raises(ValueError, match="does not exist"):
        read_token(str(tmp_path / "missing"), {})
    with pytest.raises(ValueError, match="set but blank"):
        read_token(None, {"LLMREC_AUTH_TOKEN": " "})
    p = argparse.ArgumentParser()
    serve_cmd.add_arguments(p)
    args = p.parse_args(["--run", str(make_run(tmp_path / "run")), "--auth-token", "s3cret"])
    with pytest.raises(ValueError, match="visible to every user of the machine") as exc:
        serve_cmd.run(args)
    assert "s3cret" not in str(exc.value)
    cfg = _parse_args({"run_dir": str(tmp_path / "run"), "auth_token_file": str(f)})
    assert cfg["auth_token_file"] == str(f)


def test_state_bounds_and_reservations_are_configurable(tmp_path: Path) -> None:
    run = str(make_run(tmp_path / "run"))
    cfg = _parse_args({"run_dir": run, "history_len": "50", "log_retention_days": 7, "shard_memory_mb": 1024})
    assert (cfg["history_len"], cfg["log_retention_s"], cfg["shard_memory_mb"]) == (50, 7 * 86400.0, 1024)
    assert _parse_args({"run_dir": run})["log_retention_s"] is None  # the log is kept by default
    with pytest.raises(ValueError, match="log_retention_days must be > 0"):
        _parse_args({"run_dir": run, "log_retention_days": 0})
    with pytest.raises(ValueError, match=r"history_len must be an integer in \[1, 100000\]"):
        _parse_args({"run_dir": run, "history_len": 0})


def test_route_tags_come_from_the_app_routes_and_never_hold_a_user_id() -> None:
    from starlette.requests import Request

    from llmrec.serve.ingress import _route_of

    def route(path: str) -> str:
        return _route_of(
            Request({"type": "http", "method": "GET", "path": path, "headers": [], "query_string": b""})
        )

    assert route("/users/alice-123") == "/users/{user_id:path}"
    assert route("/recommend") == "/recommend" and route("/admin/model") == "/admin/model"
    assert route("/no/such/route") == "other"
