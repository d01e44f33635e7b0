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
