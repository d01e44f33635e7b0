"""TrainConfig is the one home of the training options: `llmrec train`'s flags, their defaults, the checks."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest

from llmrec.cli import build_parser
from llmrec.config import (
    EmbedConfig,
    IndexConfig,
    ServeConfig,
    TrainConfig,
    add_config_arguments,
    config_from_args,
    config_from_dict,
    with_overrides,
)

REQUIRED = ["--data", "d", "--embeddings", "e", "--out", "o"]

# `llmrec train --help` before TrainConfig (main at de4e08e): outside scripts use these, so each must stay
TRAIN_FLAGS_BEFORE = [
    "-h", "--help", "--data", "--embeddings", "--out", "--events", "--num-workers", "--use-gpu", "--epochs",
    "--batch-size", "--lr", "--patience", "--dim", "--n-neg", "--max-len", "--val-users", "--cooc-neighbors",
    "--seed", "--holdout", "--resume", "--checkpoint-dir", "--max-failures", "--address",
]
# their parsed defaults before TrainConfig (same commit)
TRAIN_DEFAULTS_BEFORE = {
    "events": None, "num_workers": 1, "use_gpu": False, "epochs": 10, "batch_size": 256, "lr": 0.003,
    "patience": 2, "dim": 64, "n_neg": 128, "max_len": 50, "val_users": 1000, "cooc_neighbors": 100,
    "seed": 0, "holdout": "none", "resume": None, "checkpoint_dir": None, "max_failures": 0, "address": None,
}
# scorer/train.py's DEFAULTS dict before TrainConfig (same commit): the model / loss options
MODEL_DEFAULTS_BEFORE = {
    "dim": 64, "max_len": 50, "n_layers": 1, "n_heads": 2, "mlp_hidden": 128, "id_dropout": 0.3,
    "dropout": 0.1, "use_ids": True, "n_neg": 128, "head_neg": 31, "weight_decay": 0.0, "n_candidates": 200,
    "min_rating": None, "grad_clip": 5.0, "logit_scale": 20.0, "warm_start": True, "logq_correction": True,
    "val_users": 1000, "cooc_neighbors": 100, "feedback_p": 0.3, "text_arm": True, "rare_dropout_c": 2.0,
    "cold_quota": 0,
    "cold_impute_k": 10, "max_steps": None,
}


def _parser(command: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def _train_parser() -> argparse.ArgumentParser:
    return _parser("train")


def _assert_offers_old_flags(p: argparse.ArgumentParser, flags_before: list[str]) -> None:
    """Every flag the command had before its config existed is still offered."""
    flags = {s for a in p._actions for s in a.option_strings}
    assert set(flags_before) <= flags, sorted(set(flags_before) - flags)


def _argv(changed: dict, flag_of: dict | None = None) -> list[str]:
    """Command-line flags that set every field in `changed` (bools as --x / --no-x)."""
    argv = []
    for name, value in changed.items():
        flag = (flag_of or {}).get(name, "--" + name.replace("_", "-"))
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        else:
            argv += [flag, str(value)]
    return argv


def test_every_train_flag_from_before_still_exists():
    _assert_offers_old_flags(_train_parser(), TRAIN_FLAGS_BEFORE)


def test_train_defaults_unchanged_and_equal_to_train_config():
    args = _train_parser().parse_args(REQUIRED)
    assert {k: getattr(args, k) for k in TRAIN_DEFAULTS_BEFORE} == TRAIN_DEFAULTS_BEFORE
    assert config_from_args(TrainConfig, args) == TrainConfig()
    assert {k: getattr(TrainConfig(), k) for k in MODEL_DEFAULTS_BEFORE} == MODEL_DEFAULTS_BEFORE


def test_every_field_is_a_flag_that_reaches_the_config():
    """Adding a field adds its flag: a non-default value for every field, given on the command line, comes
    back in the config (bools through --x / --no-x, None through the field's cli_none value)."""
    changed = {
        "num_workers": 2, "use_gpu": True, "epochs": 3, "batch_size": 64, "lr": 0.01, "patience": 4,
        "dim": 32, "n_neg": -1, "max_len": 20, "val_users": None, "cooc_neighbors": 0, "cooc_kind": "ease",
        "seed": 7,
        "max_failures": 1, "n_layers": 2, "user_encoder": "gru", "n_heads": 4, "mlp_hidden": 64,
        "id_dropout": 0.5, "dropout": 0.0,
        "use_ids": False,
        "head_neg": 15, "weight_decay": 1e-4, "n_candidates": 50, "min_rating": 3.5, "grad_clip": 0.0,
        "logit_scale": 10.0, "warm_start": False, "logq_correction": False, "feedback_p": 0.0,
        "text_arm": False,
        "rare_dropout_c": 0.0, "cold_quota": 5, "cold_impute_k": 0, "cold_choice": "held-out-new",
        "max_steps": 100,
    }
    assert sorted(changed) == sorted(f.name for f in dataclasses.fields(TrainConfig))
    argv = list(REQUIRED)
    for name, value in changed.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        else:
            argv += [flag, str(-1 if value is None else value)]
    cfg = config_from_args(TrainConfig, _train_parser().parse_args(argv))
    assert cfg == TrainConfig(**changed)
    assert all(getattr(cfg, k) != getattr(TrainConfig(), k) for k in changed)


def test_add_config_arguments_takes_other_defaults():
    p = argparse.ArgumentParser()
    add_config_arguments(p, TrainConfig, dataclasses.replace(TrainConfig(), epochs=5, val_users=None))
    args = p.parse_args([])
    assert args.epochs == 5 and args.val_users == -1
    assert config_from_args(TrainConfig, args) == TrainConfig(epochs=5, val_users=None)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"epochs": 0}, "TrainConfig.epochs must be >= 1, got 0"),
        ({"num_workers": 4, "batch_size": 2}, r"TrainConfig.batch_size must be >= num_workers \(4"),
        ({"n_neg": -2}, "TrainConfig.n_neg must be >= -1, got -2"),
        ({"val_users": -1}, r"TrainConfig.val_users must be >= 0, or None \(-1 on the command line\)"),
        ({"lr": 0.0}, "TrainConfig.lr must be a finite number > 0, got 0.0"),
        ({"lr": "3e-3"}, r"TrainConfig.lr must be float, got '3e-3' \(str\)"),
        ({"dim": 30, "n_heads": 4}, r"TrainConfig.dim must be divisible by n_heads \(4\), got 30"),
        ({"dropout": 1.0}, r"TrainConfig.dropout must be in \[0, 1\), got 1.0"),
        ({"feedback_p": 1.5}, r"TrainConfig.feedback_p must be in \[0, 1\], got 1.5"),
        ({"cooc_kind": "knn"}, "TrainConfig.cooc_kind must be one of auto, itemknn, ease, got 'knn'"),
        ({"max_steps": 0}, "TrainConfig.max_steps must be >= 1 or None"),
        ({"cold_choice": "held-out-new", "val_users": 0},
         r"TrainConfig.cold_choice='held-out-new' trains an inner model with a validation.*val_users is 0"),
        ({"cold_choice": "heldout"},
         "TrainConfig.cold_choice must be one of made-cold, held-out-new, got 'heldout'"),
        ({"use_gpu": 1}, r"TrainConfig.use_gpu must be bool, got 1 \(int\)"),
    ],
)
def test_bad_values_name_the_field_the_value_and_the_range(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)
    with pytest.raises(ValueError, match=message):  # replace() checks again
        dataclasses.replace(TrainConfig(), **kwargs)


def test_cli_value_errors_reach_the_user():
    args = _train_parser().parse_args([*REQUIRED, "--val-users", "-5"])
    with pytest.raises(ValueError, match="TrainConfig.val_users must be >= 0.*got -5"):
        config_from_args(TrainConfig, args)


def test_int_for_float_field_becomes_float():
    assert TrainConfig(lr=1).lr == 1.0 and isinstance(TrainConfig(lr=1).lr, float)


def test_unknown_keys_list_the_valid_ones():
    valid = r"meta.json: unknown TrainConfig option\(s\) \['bogus'\]; valid: \[.*'lr'"
    with pytest.raises(ValueError, match=valid):
        config_from_dict(TrainConfig, {"bogus": 3, "epochs": 2}, "meta.json")
    with pytest.raises(ValueError, match=r"unknown TrainConfig option\(s\) \['bogus'\]"):
        with_overrides(TrainConfig(), {"bogus": 3})
    assert with_overrides(TrainConfig(), {"epochs": 2}) == TrainConfig(epochs=2)


def test_meta_config_readers_load_scorers_trained_before_train_config(tmp_path):
    """meta.json "config" of a scorer trained before TrainConfig ({**hp, num_workers, use_gpu, ray_run,
    resumed_from}): the evaluation reads its settings back and they build a TrainConfig."""
    from llmrec.eval.models import llmrec_train_config

    old = {**MODEL_DEFAULTS_BEFORE, "epochs": 5, "batch_size": 256, "lr": 0.003, "seed": 0, "patience": 2,
           "num_workers": 1, "use_gpu": False, "ray_run": "train-20260101-000000-1-000", "resumed_from": None,
           "val_users": None}
    (tmp_path / "meta.json").write_text(json.dumps({"stage": "train", "config": old}))
    got = llmrec_train_config(tmp_path)
    assert set(got) == set(old) - {"ray_run", "resumed_from"}
    assert TrainConfig(**got) == TrainConfig(epochs=5, val_users=None)
    # and today's meta "config" keeps every key it had (asdict of the config + the run's records)
    assert set(old) - {"ray_run", "resumed_from"} <= set(dataclasses.asdict(TrainConfig()))


def test_pipeline_epochs_go_through_train_config():
    from llmrec.commands.pipeline import PIPELINE_TRAIN, stage_argv, train_config

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    pipe = sub.choices["pipeline"]
    args = pipe.parse_args(["--dataset", "x", "--source", "s", "--out", "o"])
    assert args.epochs == PIPELINE_TRAIN.epochs == 5 and args.num_workers is None
    assert train_config(args) == TrainConfig(epochs=5)
    train_argv = stage_argv(args, "o")["train"]
    assert train_argv[train_argv.index("--epochs") + 1] == "5"
    args = pipe.parse_args(["--dataset", "x", "--source", "s", "--out", "o", "--epochs", "0"])
    with pytest.raises(ValueError, match="TrainConfig.epochs must be >= 1, got 0"):
        train_config(args)
    # the flags the pipeline hands `llmrec train` build the very config it checked
    args = pipe.parse_args(["--dataset", "x", "--source", "s", "--out", "o", "--epochs", "3",
                            "--num-workers", "2", "--cold-choice", "held-out-new"])
    tr = stage_argv(args, "o")["train"]
    assert config_from_args(TrainConfig, _train_parser().parse_args(tr[1:])) == train_config(args)
    assert train_config(args).cold_choice == "held-out-new"
    # without --cold-choice the train stage's argv (its reuse key) is what it was
    assert "--cold-choice" not in stage_argv(pipe.parse_args(["--dataset", "x", "--source", "s", "--out",
                                                              "o"]), "o")["train"]


# ---------------------------------------------------------------------------------------------------------
# EmbedConfig: `llmrec embed`
# ---------------------------------------------------------------------------------------------------------
EMBED_REQUIRED = ["--items", "i", "--out", "o"]
# `llmrec embed --help` before EmbedConfig (main at c157d11)
EMBED_FLAGS_BEFORE = [
    "-h", "--help", "--items", "--out", "--model", "--batch-size", "--max-length", "--num-actors", "--device",
    "--num-gpus", "--bucketing", "--rows-per-block", "--address",
]
# their parsed defaults before EmbedConfig (same commit; embed_catalog's keyword defaults were the same)
EMBED_DEFAULTS_BEFORE = {
    "items": "i", "out": "o", "model": None, "batch_size": 128, "max_length": 128, "num_actors": None,
    "device": "auto", "num_gpus": None, "bucketing": "group", "rows_per_block": None, "address": None,
}


def test_every_embed_flag_from_before_still_exists_with_its_default():
    p = _parser("embed")
    _assert_offers_old_flags(p, EMBED_FLAGS_BEFORE)
    args = p.parse_args(EMBED_REQUIRED)
    assert {k: getattr(args, k) for k in EMBED_DEFAULTS_BEFORE} == EMBED_DEFAULTS_BEFORE
    assert config_from_args(EmbedConfig, args) == EmbedConfig()
    # the choices the flags always offered
    for bad in (["--device", "cuda:0"], ["--bucketing", "sorted"]):
        with pytest.raises(SystemExit):
            p.parse_args([*EMBED_REQUIRED, *bad])


def test_every_embed_field_is_a_flag_that_reaches_the_config():
    changed = {"model": "m", "batch_size": 16, "max_length": 32, "num_actors": 3, "device": "cpu",
               "num_gpus": 2, "bucketing": "dataset", "rows_per_block": 50}
    assert sorted(changed) == sorted(f.name for f in dataclasses.fields(EmbedConfig))
    cfg = config_from_args(EmbedConfig, _parser("embed").parse_args([*EMBED_REQUIRED, *_argv(changed)]))
    assert cfg == EmbedConfig(**changed)
    assert all(getattr(cfg, k) != getattr(EmbedConfig(), k) for k in changed)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"batch_size": 0}, "EmbedConfig.batch_size must be >= 1, got 0"),
        ({"max_length": 1}, "EmbedConfig.max_length must be >= 2, got 1"),
        ({"num_actors": 0}, "EmbedConfig.num_actors must be >= 1 or None, got 0"),
        ({"num_gpus": -1}, "EmbedConfig.num_gpus must be >= 1 or None, got -1"),
        ({"rows_per_block": 0}, "EmbedConfig.rows_per_block must be >= 1 or None, got 0"),
        ({"device": "gpu"},
         r"EmbedConfig.device must be one of \['auto', 'cpu', 'cuda'\] or 'cuda:i', got 'gpu'"),
        ({"bucketing": "x"}, r"EmbedConfig.bucketing must be 'group' \(or its old name 'dataset'\), got 'x'"),
        ({"batch_size": "128"}, r"EmbedConfig.batch_size must be int, got '128' \(str\)"),
        ({"model": ""}, "EmbedConfig.model must be a model folder or hub name"),
    ],
)
def test_bad_embed_values_name_the_field_the_value_and_the_range(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EmbedConfig(**kwargs)
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(EmbedConfig(), **kwargs)


def test_embed_config_takes_cuda_i_in_code():
    assert EmbedConfig(device="cuda:1").device == "cuda:1"


def test_embed_catalog_checks_its_options_before_reading_anything(tmp_path):
    """The keyword form builds the config: an unknown option lists the valid ones, a bad value names the
    field, both before the (missing) input is looked at."""
    from llmrec.embed.ray_embed import embed_catalog

    unknown = r"embed_catalog: unknown EmbedConfig option\(s\) \['batch'\]; valid"
    with pytest.raises(ValueError, match=unknown):
        embed_catalog(tmp_path / "missing", tmp_path / "o", batch=3)
    with pytest.raises(ValueError, match="EmbedConfig.max_length must be >= 2, got 0"):
        embed_catalog(tmp_path / "missing", tmp_path / "o", EmbedConfig(), max_length=0)


def test_pipeline_embed_options_go_through_embed_config():
    from llmrec.commands.pipeline import embed_config, stage_argv

    pipe = _parser("pipeline")
    base = ["--dataset", "x", "--source", "s", "--out", "o"]
    assert embed_config(pipe.parse_args(base)) == EmbedConfig()
    args = pipe.parse_args([*base, "--batch-size", "64", "--model", "m"])
    assert embed_config(args) == EmbedConfig(batch_size=64, model="m")
    # the flags the pipeline hands `llmrec embed` build the very config it checked
    em = stage_argv(args, "o")["embed"]
    assert config_from_args(EmbedConfig, _parser("embed").parse_args(em[1:])) == embed_config(args)
    with pytest.raises(ValueError, match="EmbedConfig.batch_size must be >= 1, got 0"):
        embed_config(pipe.parse_args([*base, "--batch-size", "0"]))


# ---------------------------------------------------------------------------------------------------------
# IndexConfig: `llmrec index`
# ---------------------------------------------------------------------------------------------------------
INDEX_REQUIRED = ["--out", "o"]
# `llmrec index --help` before IndexConfig (main at c157d11)
INDEX_FLAGS_BEFORE = [
    "-h", "--help", "--embeddings", "--out", "--kind", "--index-kind", "--check", "--sample", "--device",
    "--param", "--add-embeddings", "--skip-existing",
]
# their parsed defaults before IndexConfig (same commit; build_index's keyword defaults were the same, and
# its batch_rows 65_536; the kind parameters came only from --param)
INDEX_DEFAULTS_BEFORE = {
    "embeddings": None, "out": "o", "kind": "auto", "check": False, "sample": 1000, "device": "auto",
    "param": [], "add_embeddings": None, "skip_existing": False,
}


def test_every_index_flag_from_before_still_exists_with_its_default():
    from llmrec.commands.index import index_config

    p = _parser("index")
    _assert_offers_old_flags(p, INDEX_FLAGS_BEFORE)
    args = p.parse_args(INDEX_REQUIRED)
    assert {k: getattr(args, k) for k in INDEX_DEFAULTS_BEFORE} == INDEX_DEFAULTS_BEFORE
    assert index_config(args) == IndexConfig() and IndexConfig().batch_rows == 65_536
    assert IndexConfig().params() == {}
    # --index-kind is the same flag as --kind; --check and --skip-existing are switches as before
    args = p.parse_args([*INDEX_REQUIRED, "--index-kind", "IVF32,SQ8", "--check", "--skip-existing"])
    assert index_config(args) == IndexConfig(kind="IVF32,SQ8", check=True, skip_existing=True)


def test_every_index_field_is_a_flag_or_a_param_that_reaches_the_config():
    flagged = {"kind": "hnsw", "check": True, "sample": 200, "device": "cpu", "skip_existing": True,
               "batch_rows": 256}
    params = {"M": 16, "ef_construction": 80, "ef_search": 64, "target_recall": 0.9, "nlist": 8,
              "nprobe": 4, "train_size": 500, "chunk_elems": 1024}
    assert sorted({**flagged, **params}) == sorted(f.name for f in dataclasses.fields(IndexConfig))
    from llmrec.commands.index import index_config

    argv = [*INDEX_REQUIRED, *_argv(flagged)]
    for k, v in params.items():
        argv += ["--param", f"{k}={v}"]
    cfg = index_config(_parser("index").parse_args(argv))
    assert cfg == IndexConfig(**flagged, **params) and cfg.params() == params
    assert isinstance(cfg.target_recall, float) and isinstance(cfg.M, int)


@pytest.mark.parametrize(
    "param, message",
    [
        ("M", "--param expects KEY=VALUE, got 'M'"),
        ("efsearch=5", r"--param efsearch: unknown index parameter; valid: \[.*'ef_search'"),
        ("nlist=1.5", "--param nlist: value must be an integer, got '1.5'"),
        ("target_recall=high", "--param target_recall: value must be a number, got 'high'"),
        ("target_recall=1.5", r"IndexConfig.target_recall must be in \(0, 1\] or None \(0.97\), got 1.5"),
        ("M=0", r"IndexConfig.M must be >= 1 or None \(the kind's default\), got 0"),
    ],
)
def test_bad_index_params_are_clear_errors(param, message):
    from llmrec.commands.index import index_config

    args = _parser("index").parse_args([*INDEX_REQUIRED, "--param", param])
    with pytest.raises(ValueError, match=message):
        index_config(args)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sample": 0}, "IndexConfig.sample must be >= 1, got 0"),
        ({"batch_rows": 0}, "IndexConfig.batch_rows must be >= 1, got 0"),
        ({"device": "gpu"}, "IndexConfig.device must be auto, cpu, cuda or cuda:i, got 'gpu'"),
        ({"kind": " "}, "IndexConfig.kind must be auto, flat, hnsw, ivf, torch or a FAISS index_factory"),
        ({"nprobe": -1}, r"IndexConfig.nprobe must be >= 0 or None \(the kind's default\), got -1"),
        ({"check": "yes"}, r"IndexConfig.check must be bool, got 'yes' \(str\)"),
    ],
)
def test_bad_index_values_name_the_field_the_value_and_the_range(kwargs, message):
    with pytest.raises(ValueError, match=message):
        IndexConfig(**kwargs)


def test_build_index_checks_its_options_before_reading_anything(tmp_path):
    from llmrec.index.build import add_to_index, build_index

    unknown = r"build_index: unknown IndexConfig option\(s\) \['nprobes'\]; valid"
    with pytest.raises(ValueError, match=unknown):
        build_index(tmp_path / "missing", tmp_path / "o", nprobes=3)
    with pytest.raises(ValueError, match="IndexConfig.sample must be >= 1, got 0"):
        build_index(tmp_path / "missing", tmp_path / "o", IndexConfig(kind="flat"), sample=0)
    with pytest.raises(ValueError, match=r"add_to_index: unknown IndexConfig option\(s\) \['skip'\]"):
        add_to_index(tmp_path / "missing", tmp_path / "e", skip=True)


@pytest.mark.parametrize("command, job", [("embed", "embed_catalog"), ("index", "build_index")])
def test_cluster_job_yaml_builds_the_stage_config(command, job):
    """cluster/jobs/<job>.yaml reaches the command's flags (`--config`), which build a valid config."""
    from pathlib import Path

    import yaml

    from llmrec.commands.index import index_config
    from llmrec.jobs._entry import config_to_argv

    path = Path(__file__).resolve().parents[1] / "cluster" / "jobs" / f"{job}.yaml"
    data = yaml.safe_load(path.read_text())
    args = _parser(command).parse_args(config_to_argv(data, str(path)))
    cfg = config_from_args(EmbedConfig, args) if command == "embed" else index_config(args)
    for key, value in data.items():
        name = key.replace("-", "_")
        if hasattr(cfg, name):
            assert getattr(cfg, name) == value, key


# ---------------------------------------------------------------------------------------------------------
# ServeConfig: `llmrec serve` and build_app's args
# ---------------------------------------------------------------------------------------------------------
SERVE_REQUIRED = ["--run", "r"]
# `llmrec serve --help` before ServeConfig (main at c157d11)
SERVE_FLAGS_BEFORE = [
    "-h", "--help", "--run", "--host", "--port", "--shards", "--auth-token-file", "--auth-token",
    "--replicas",
    "--model", "--events", "--log-user-ids", "--no-run-users", "--history-len", "--log-retention-days",
    "--shard-memory-mb", "--state-backend", "--address", "--train-in-background",
]
# their parsed defaults before ServeConfig (same commit); `no_run_users: False` was the store_true flag
# `--no-run-users`, which is now the `--no-` side of `--run-users` (dest load_run_users, default True)
SERVE_DEFAULTS_BEFORE = {
    "run": "r", "host": "127.0.0.1", "port": 8000, "shards": 4, "auth_token_file": None, "auth_token": None,
    "replicas": 1, "model": None, "events": None, "log_user_ids": False, "no_run_users": False,
    "history_len": 200, "log_retention_days": None, "shard_memory_mb": 256, "state_backend": "file",
    "address": None, "train_in_background": False,
}
# build_app's defaults before ServeConfig (llmrec/serve/app.py `_parse_args`, same commit)
APP_DEFAULTS_BEFORE = {"n_shards": 4, "num_replicas": 1, "model": None, "log_user_ids": False,
                       "load_run_users": True, "history_len": 200, "log_retention_days": None,
                       "shard_memory_mb": 256}


def test_every_serve_flag_from_before_still_exists_with_its_default():
    p = _parser("serve")
    _assert_offers_old_flags(p, SERVE_FLAGS_BEFORE)
    args = p.parse_args(SERVE_REQUIRED)
    got = {k: getattr(args, k) for k in SERVE_DEFAULTS_BEFORE if k != "no_run_users"}
    assert got == {k: v for k, v in SERVE_DEFAULTS_BEFORE.items() if k != "no_run_users"}
    assert args.load_run_users is not SERVE_DEFAULTS_BEFORE["no_run_users"]
    assert p.parse_args([*SERVE_REQUIRED, "--no-run-users"]).load_run_users is False
    assert config_from_args(ServeConfig, args) == ServeConfig()
    assert ServeConfig().app_args() == {**APP_DEFAULTS_BEFORE, "split_model": False}  # one key added since
    with pytest.raises(SystemExit):  # the choices --state-backend always offered
        p.parse_args([*SERVE_REQUIRED, "--state-backend", "s3"])


def test_every_serve_field_is_a_flag_that_reaches_the_config():
    changed = {"host": "0.0.0.0", "port": 8123, "shards": 2, "replicas": 3, "model": "m",
               "log_user_ids": True,
               "load_run_users": False, "history_len": 50, "log_retention_days": 7.5, "shard_memory_mb": 0,
               "state_backend": "redis", "train_in_background": True, "split_model": True}
    assert sorted(changed) == sorted(f.name for f in dataclasses.fields(ServeConfig))
    argv = [*SERVE_REQUIRED, *_argv(changed, {"load_run_users": "--run-users"})]
    assert "--no-run-users" in argv
    cfg = config_from_args(ServeConfig, _parser("serve").parse_args(argv))
    assert cfg == ServeConfig(**changed)
    assert all(getattr(cfg, k) != getattr(ServeConfig(), k) for k in changed)


def test_serve_config_holds_no_secret():
    """The token and the Redis URL are read when the app starts, never held in (or printed with) the config;
    a token on the command line is still refused."""
    names = [f.name for f in dataclasses.fields(ServeConfig)]
    assert not [n for n in names if any(w in n for w in ("token", "password", "secret", "url"))], names
    args = _parser("serve").parse_args([*SERVE_REQUIRED, "--auth-token-file", "/run/secrets/tok"])
    assert "/run/secrets/tok" not in repr(config_from_args(ServeConfig, args))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"port": 0}, r"ServeConfig.port must be an integer in \[1, 65535\], got 0"),
        ({"shards": 0}, r"ServeConfig.shards \(build_app arg n_shards\) must be an integer in \[1, 1024\]"),
        ({"replicas": 1001}, r"ServeConfig.replicas \(build_app arg num_replicas\) must be an integer in "),
        ({"history_len": 0}, r"ServeConfig.history_len must be an integer in \[1, 100000\], got 0"),
        ({"shard_memory_mb": -1}, r"ServeConfig.shard_memory_mb must be an integer in \[0, 1048576\]"),
        ({"log_retention_days": 0.0}, r"ServeConfig.log_retention_days must be > 0 \(or None"),
        ({"log_retention_days": float("nan")}, r"ServeConfig.log_retention_days must be > 0"),
        ({"state_backend": "s3"}, "ServeConfig.state_backend must be 'file' or 'redis', got 's3'"),
        ({"host": ""}, "ServeConfig.host must be a host name or address"),
        ({"port": "8000"}, r"ServeConfig.port must be int, got '8000' \(str\)"),
    ],
)
def test_bad_serve_values_name_the_field_the_value_and_the_range(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ServeConfig(**kwargs)


def test_serve_cli_checks_its_options_before_starting_ray():
    from llmrec.commands import serve as serve_cmd

    args = _parser("serve").parse_args([*SERVE_REQUIRED, "--port", "70000"])
    with pytest.raises(ValueError, match=r"ServeConfig.port must be an integer in \[1, 65535\], got 70000"):
        serve_cmd.run(args)


def test_build_app_args_take_serve_config_defaults_and_checks(tmp_path):
    """`serve run llmrec.serve.app:build_app run_dir=RUN n_shards=...` (strings) and `llmrec serve`
    (ServeConfig.app_args) reach the same options, with ServeConfig's defaults and ranges."""
    from llmrec.serve.app import _parse_args

    run = tmp_path / "run"
    for sub in ("embeddings", "index"):
        (run / sub).mkdir(parents=True)
        (run / sub / "meta.json").write_text("{}")
    base = _parse_args({"run_dir": str(run)})
    assert {k: base[k] for k in ("n_shards", "num_replicas", "log_user_ids", "history_len",
                                 "shard_memory_mb", "log_retention_s")} == {
        "n_shards": 4, "num_replicas": 1, "log_user_ids": False, "history_len": 200, "shard_memory_mb": 256,
        "log_retention_s": None}
    cfg = ServeConfig(shards=8, replicas=2, history_len=30, log_retention_days=2.0, shard_memory_mb=0,
                      log_user_ids=True)
    from_cfg = _parse_args({"run_dir": str(run), **cfg.app_args()})
    from_strings = _parse_args({"run_dir": str(run), "n_shards": "8", "num_replicas": "2",
                                "history_len": "30",
                                "log_retention_days": "2", "shard_memory_mb": "0", "log_user_ids": "true"})
    assert from_cfg == from_strings
    assert (from_cfg["n_shards"], from_cfg["num_replicas"], from_cfg["log_retention_s"],
            from_cfg["shard_memory_mb"]) == (8, 2, 2 * 86400.0, None)
    with pytest.raises(ValueError, match=r"ServeConfig.shards \(build_app arg n_shards\) must be an integer"):
        _parse_args({"run_dir": str(run), "n_shards": "0"})
    with pytest.raises(ValueError, match="n_shards must be an integer, got 'four'"):
        _parse_args({"run_dir": str(run), "n_shards": "four"})
