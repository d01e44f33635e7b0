"""llmrec.storage: artifact folders on file://, fsspec memory:// and a real (local moto) S3 server.

The S3 tests run the real `llmrec pipeline` (prepare, embed, index) with `--out s3://...` against
`moto.server.ThreadedMotoServer` on 127.0.0.1 and pyarrow's own S3 client; they fail without moto
(`pip install -e '.[dev]'` brings it). On that run, in the default test run: `llmrec train` (1 epoch, a small
model), `evaluate` (baselines), `replay`, `index --add-embeddings`, each with its artifact flags on S3 and
compared with the same command on the local run. Marked slow (`make test-slow`): `pipeline --stages
train,evaluate` on S3 and locally (equal weights and metrics), `recommend --model llmrec` and `replay` from
that run, `train --resume s3://...`, and `llmrec serve --run s3://... --events DIR` over HTTP.
"""

from __future__ import annotations

import io
import json
import logging
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from llmrec import storage
from llmrec.artifacts import ArtifactError, write_meta
from llmrec.cli import main as cli_main
from llmrec.storage import staging


def _write_artifact(folder: Path, stage: str = "embed", **files: str) -> None:
    for rel, text in files.items():
        p = folder / rel.replace("__", "/")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    write_meta(folder, stage, dim=3)


def _remote_files(uri: str) -> dict[str, bytes]:
    import pyarrow.fs as pafs

    fs, path = storage.filesystem_for(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    out = {}
    for i in infos:
        if i.type == pafs.FileType.File:
            with fs.open_input_stream(i.path) as f:
                out[i.path[len(path.rstrip("/")) + 1 :]] = f.read()
    return out


def _local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(params=["file", "memory", "s3"])
def base_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh remote folder: file:// on local disk, fsspec's in-process memory://, or the local S3 server."""
    if request.param == "file":
        return f"file://{tmp_path}/remote"
    if request.param == "memory":
        return f"memory://llmrec-test-{uuid.uuid4().hex[:8]}/remote"
    endpoint = request.getfixturevalue("s3_endpoint")
    return f"s3://{_bucket(endpoint)}/remote?endpoint_override={endpoint}&scheme=http"


# ---------------------------------------------------------------------------------------------- helpers


def test_uri_helpers() -> None:
    assert storage.is_uri("s3://b/k") and storage.is_uri("file:///tmp/x") and storage.is_uri("memory://x")
    assert not storage.is_uri("runs/ml") and not storage.is_uri("/abs/path") and not storage.is_uri(None)
    assert storage.join("s3://b/run?endpoint_override=h:9&scheme=http", "data", "meta.json") == (
        "s3://b/run/data/meta.json?endpoint_override=h:9&scheme=http"
    )
    assert storage.join("runs/ml", "data") == "runs/ml/data"
    red = storage.redact("s3://b/k?access_key=AK&secret_key=SECRET&endpoint_override=h:9")
    assert "SECRET" not in red and "AK" not in red and "endpoint_override=h:9" in red
    assert storage.default_cache_root({"LLMREC_CACHE_DIR": "/x/c"}) == Path("/x/c")
    assert storage.default_cache_root({}) == Path("~/.cache/llmrec/artifacts").expanduser()


def test_train_with_a_uri_out_keeps_ray_checkpoints_beside_it() -> None:
    """A URI --out is staged on the driver's node, which Ray Train workers on other nodes cannot write to:
    train's Ray run storage defaults to OUT-ray at the same URI (tests/test_multinode.py runs it on 2
    nodes)."""
    from llmrec.cli import build_parser

    def checkpoint_dir(*argv: str) -> str | None:
        args = build_parser().parse_args(["train", "--data", "d", "--embeddings", "e", *argv])
        args._storage(args)
        return args.checkpoint_dir

    assert checkpoint_dir("--out", "s3://b/run/scorer?endpoint_override=h:9&scheme=http") == (
        "s3://b/run/scorer-ray?endpoint_override=h:9&scheme=http"
    )
    assert checkpoint_dir("--out", "gs://b/run/scorer/") == "gs://b/run/scorer-ray"
    assert checkpoint_dir("--out", "runs/ml/scorer") is None  # local: OUT/ray (scorer.dataset.storage_path)
    assert checkpoint_dir("--out", "s3://b/s", "--checkpoint-dir", "/mnt/ckpt") == "/mnt/ckpt"


def test_unknown_scheme_names_what_to_install() -> None:
    with pytest.raises(ValueError, match="neither pyarrow .* nor fsspec knows the scheme 'zzz'"):
        storage.filesystem_for("zzz://bucket/x")
    try:
        import adlfs  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="adlfs"):  # fsspec knows az:// but its package is missing
            storage.filesystem_for("az://container/x")


# ---------------------------------------------------------------------------------------------- round trip


def test_stage_out_then_in_round_trip(base_uri: str, tmp_path: Path) -> None:
    uri = storage.join(base_uri, "embeddings")
    cache = tmp_path / "cache"
    with storage.stage_out(uri, cache) as local:
        assert local.is_dir() and not any(local.iterdir()) and local.name == "embeddings"
        _write_artifact(local, **{"a.bin": "A" * 1000, "sub__b.txt": "B"})
        written = _local_files(local)
    remote = _remote_files(uri)
    assert remote == written  # every file, nested ones too; no incomplete mark left behind
    assert storage.INCOMPLETE_MARK not in remote

    fresh = storage.stage_in(uri, tmp_path / "cache2", stage="embed")
    assert fresh.name == "embeddings" and _local_files(fresh) == written
    # unchanged meta.json: the cached copy is reused, not downloaded again (the sentinel survives)
    (fresh / "sentinel").write_text("kept")
    assert storage.stage_in(uri, tmp_path / "cache2") == fresh and (fresh / "sentinel").exists()
    # stage_out made the uploaded folder the writer's own cache entry: no download there at all
    assert _local_files(storage.stage_in(uri, cache)) == written


def test_new_version_replaces_old_and_cache_follows(base_uri: str, tmp_path: Path) -> None:
    uri = storage.join(base_uri, "index")
    with storage.stage_out(uri, tmp_path / "w") as local:
        _write_artifact(local, "index", **{"old.txt": "v1", "same.txt": "v1"})
    reader = tmp_path / "r"
    assert (storage.stage_in(uri, reader) / "old.txt").read_text() == "v1"
    time.sleep(1.1)  # meta.json created_at has 1 s resolution: make the new version's bytes differ
    with storage.stage_out(uri, tmp_path / "w") as local:
        _write_artifact(local, "index", **{"same.txt": "v2"})
    assert sorted(_remote_files(uri)) == ["meta.json", "same.txt"]  # the stale file of v1 is gone
    got = storage.stage_in(uri, reader)
    assert (got / "same.txt").read_text() == "v2" and not (got / "old.txt").exists()


def test_a_growing_folder_is_versioned_by_its_listing(base_uri: str, tmp_path: Path) -> None:
    """An event log keeps its meta.json while segments are added: `In(by_listing=True)` sees the new ones."""
    uri = storage.join(base_uri, "events")
    storage.write_bytes(storage.join(uri, "meta.json"), b'{"stage": "events"}')
    storage.write_bytes(storage.join(uri, "s000-000000000001.jsonl"), b'{"seq": 1}\n')
    spec = {"events": storage.In(by_listing=True)}

    def staged() -> list[str]:
        with storage.localize({"events": uri}, spec, tmp_path / "c") as local:
            return sorted(p.name for p in Path(local["events"]).iterdir())

    assert staged() == ["meta.json", "s000-000000000001.jsonl"]
    by_meta = storage.stage_in(uri, tmp_path / "c2", need_meta=False)
    storage.write_bytes(storage.join(uri, "s000-000000000002.jsonl"), b'{"seq": 2}\n')
    assert staged() == ["meta.json", "s000-000000000001.jsonl", "s000-000000000002.jsonl"]
    # keyed by the unchanged meta.json (as artifacts are), the cached copy would have been reused
    assert storage.stage_in(uri, tmp_path / "c2", need_meta=False) == by_meta
    assert not (by_meta / "s000-000000000002.jsonl").exists()


def test_meta_json_is_uploaded_last(tmp_path: Path) -> None:
    uri = f"file://{tmp_path}/remote/emb"
    with storage.stage_out(uri, tmp_path / "c") as local:
        _write_artifact(local, **{f"part-{i}.bin": "x" * 10_000 for i in range(20)})
    folder = tmp_path / "remote" / "emb"
    meta_t = (folder / "meta.json").stat().st_mtime_ns
    assert all(p.stat().st_mtime_ns <= meta_t for p in folder.iterdir())


def test_failed_block_uploads_nothing_and_keeps_previous_version(base_uri: str, tmp_path: Path) -> None:
    uri = storage.join(base_uri, "scorer")
    with pytest.raises(RuntimeError, match="boom"):
        with storage.stage_out(uri, tmp_path / "c") as local:
            _write_artifact(local, "train", **{"model.pt": "half"})
            raise RuntimeError("boom")
    assert not storage.exists(uri)
    with storage.stage_out(uri, tmp_path / "c") as local:
        _write_artifact(local, "train", **{"model.pt": "good"})
    before = _remote_files(uri)
    with pytest.raises(RuntimeError):
        with storage.stage_out(uri, tmp_path / "c") as local:
            _write_artifact(local, "train", **{"model.pt": "bad", "extra.txt": "x"})
            raise RuntimeError("boom")
    assert _remote_files(uri) == before
    assert not list((tmp_path / "c" / "staging").iterdir())  # staging folders are cleaned up either way


def test_missing_meta_is_a_clear_artifact_error(base_uri: str, tmp_path: Path) -> None:
    uri = storage.join(base_uri, "embeddings")
    storage.write_bytes(storage.join(uri, "embeddings.parquet"), b"half an upload")
    with pytest.raises(
        ArtifactError, match=r"is not an llmrec artifact: .*meta\.json does not exist.*llmrec embed"
    ):
        storage.stage_in(uri, tmp_path / "c", stage="embed")
    with pytest.raises(FileNotFoundError, match="does not exist; run `llmrec prepare`"):
        storage.stage_in(storage.join(base_uri, "nothing"), tmp_path / "c", stage="prepare")
    # a raw folder (e.g. a dataset source) needs no meta.json
    raw = storage.stage_in(uri, tmp_path / "c", need_meta=False)
    assert (raw / "embeddings.parquet").read_bytes() == b"half an upload"


def test_refuses_to_overwrite_a_folder_that_is_not_an_artifact(base_uri: str, tmp_path: Path) -> None:
    storage.write_bytes(storage.join(base_uri, "precious.csv"), b"not ours")
    with pytest.raises(ValueError, match="refusing to overwrite .* not an llmrec artifact"):
        with storage.stage_out(base_uri, tmp_path / "c"):
            pytest.fail("the block must not run")
    assert storage.read_bytes(storage.join(base_uri, "precious.csv")) == b"not ours"


def test_update_and_add_modes(base_uri: str, tmp_path: Path) -> None:
    uri = storage.join(base_uri, "eval")
    with storage.stage_out(uri, tmp_path / "c") as local:
        _write_artifact(local, "evaluate", **{"metrics.json": "{}"})
    with storage.stage_out(uri, tmp_path / "c", mode="add") as local:
        (local / "replay.json").write_text("[]")  # added next to the artifact's files, nothing deleted
    assert sorted(_remote_files(uri)) == ["meta.json", "metrics.json", "replay.json"]
    with storage.stage_out(uri, tmp_path / "c", mode="update") as local:
        assert sorted(p.name for p in local.iterdir()) == ["meta.json", "metrics.json", "replay.json"]
        (local / "metrics.json").write_text('{"v": 2}')
    assert _remote_files(uri)["metrics.json"] == b'{"v": 2}'


def test_add_into_a_new_folder_keeps_it_replaceable(base_uri: str, tmp_path: Path) -> None:
    """`replay` before `evaluate`: RUN/eval gets replay.json but no meta.json; evaluate may still replace
    it."""
    uri = storage.join(base_uri, "eval")
    with storage.stage_out(uri, tmp_path / "c", mode="add") as local:
        (local / "replay.json").write_text("{}")
    assert sorted(_remote_files(uri)) == [storage.ADDED_MARK, "replay.json"]
    with storage.stage_out(uri, tmp_path / "c") as local:  # no "refusing to overwrite": the folder is ours
        _write_artifact(local, "evaluate", **{"metrics.json": "{}"})
    assert sorted(_remote_files(uri)) == ["meta.json", "metrics.json"]
    # adding into a folder that existed without a meta.json does not make it ours
    foreign = storage.join(base_uri, "mine")
    storage.write_bytes(storage.join(foreign, "notes.txt"), b"keep")
    with storage.stage_out(foreign, tmp_path / "c", mode="add") as local:
        (local / "replay.json").write_text("{}")
    assert sorted(_remote_files(foreign)) == ["notes.txt", "replay.json"]
    with pytest.raises(ValueError, match="refusing to overwrite"):
        with storage.stage_out(foreign, tmp_path / "c"):
            pass


def test_single_files_in_and_out(base_uri: str, tmp_path: Path) -> None:
    uri = storage.join(base_uri, "users.txt")
    with storage.stage_out_file(uri, tmp_path / "c") as local:
        local.write_text("u1\nu2\n")
    got = storage.stage_in(uri, tmp_path / "c2")
    assert got.name == "users.txt" and got.read_text() == "u1\nu2\n"


def test_localize_passes_local_paths_through(tmp_path: Path) -> None:
    values = {"items": "runs/x/data", "out": str(tmp_path / "o"), "k": 3}
    spec = {"items": storage.In("prepare"), "out": storage.Out()}
    with storage.localize(values, spec, tmp_path / "cache") as local:
        assert local == values
    assert not (tmp_path / "cache").exists() and not (tmp_path / "o").exists()


def test_localize_stages_a_run_folder_and_refuses_local_only(base_uri: str, tmp_path: Path) -> None:
    run = storage.join(base_uri, "run")
    for part in ("embeddings", "scorer"):
        with storage.stage_out(storage.join(run, part), tmp_path / "c") as local:
            _write_artifact(local, **{"x.txt": part})
    spec = {"run": storage.Run(("data", "embeddings", "scorer")), "events": storage.LocalOnly("needs fsync")}
    with storage.localize({"run": run, "events": None}, spec, tmp_path / "c") as local:
        got = Path(local["run"])
        assert (got / "embeddings" / "x.txt").read_text() == "embeddings"
        assert (got / "scorer" / "meta.json").is_file() and not (
            got / "data"
        ).exists()  # absent part left out
    with pytest.raises(ValueError, match="--events .*must be a local folder: needs fsync"):
        with storage.localize({"run": run, "events": run}, spec, tmp_path / "c"):
            pass


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_failed_command_uploads_nothing(base_uri: str, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    data = storage.join(base_uri, "data")
    with storage.stage_out(data, tmp_path / "w") as local:
        _write_artifact(local, "prepare", **{"items.parquet": "x"})
    out = storage.join(base_uri, "index")
    rc = cli_main(["index", "--embeddings", data, "--out", out])  # a prepare folder, not embeddings
    assert rc == 2
    err = capsys.readouterr().err  # the message names the URI, not the local cached copy
    assert f"{data.partition('?')[0]} holds a 'prepare' artifact, expected a 'embed' artifact" in err, err
    assert not storage.exists(out)


def test_cli_serve_needs_a_local_event_log(tmp_path: Path, capsys) -> None:
    rc = cli_main(["serve", "--run", "s3://bucket/run"])
    assert rc == 2 and "pass --events DIR" in capsys.readouterr().err
    rc = cli_main(["serve", "--run", str(tmp_path), "--events", "s3://bucket/events"])
    assert rc == 2 and "--events s3://bucket/events: must be a local folder" in capsys.readouterr().err


def test_serve_app_and_deploy_refuse_a_uri_run(capsys) -> None:
    """Replicas read the run folder from their own disk: a URI run_dir is a clear error, not a missing dir."""
    from jobs import deploy
    from llmrec.serve.app import build_app

    with pytest.raises(
        ValueError, match="run_dir 's3://bucket/run' is a URI, but replicas read the run folder"
    ):
        build_app({"run_dir": "s3://bucket/run"})
    assert deploy.main(["--run", "s3://bucket/run", "--hint"]) == 2
    assert "--run s3://bucket/run: a URI; Serve replicas read" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- S3 (moto)


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """A local S3 server (moto) on 127.0.0.1 with fake credentials: yields "host:port"."""
    import moto.server as server_mod  # the dev extra's moto[server]: missing, the S3 tests fail, never skip
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        _restart_ray_with_this_env()
        yield f"{host}:{port}"
    server.stop()


def _restart_ray_with_this_env() -> None:
    """Ray workers (which read and write s3:// themselves) take their environment from the raylet, i.e. from
    the process that started Ray: a session Ray started before the fake credentials were set would send
    anonymous requests. Restart it here (the same settings as conftest's ray_local)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
        ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)


def _bucket(endpoint: str) -> str:
    import pyarrow.fs as pafs

    name = f"llmrec-{uuid.uuid4().hex[:8]}"
    pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", allow_bucket_creation=True).create_dir(name)
    return name


def _movielens_like_source(folder: Path, n_items: int = 60, n_users: int = 12) -> Path:
    """A tiny synthetic dataset in MovieLens' file layout, so that `llmrec pipeline` can prepare it."""
    from llmrec.data.synthetic import make_catalog, make_interactions

    folder.mkdir(parents=True)
    items = make_catalog(n_items, n_topics=4, seed=0)
    pd.DataFrame({"movieId": items["item_id"], "title": items["text"], "genres": items["topic_name"]}).to_csv(
        folder / "movies.csv", index=False
    )
    ev = make_interactions(items, n_users=n_users, events_per_user=6, seed=0)
    pd.DataFrame(
        {"userId": ev["user_id"], "movieId": ev["item_id"], "rating": 4.0, "timestamp": ev["ts"]}
    ).to_csv(folder / "ratings.csv", index=False)
    pd.DataFrame(columns=["userId", "movieId", "tag", "timestamp"]).to_csv(folder / "tags.csv", index=False)
    return folder


@pytest.fixture(scope="module")
def s3_pipeline(
    s3_endpoint: str, ray_local: Any, tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """`llmrec pipeline --stages prepare,embed,index` twice into s3://..., once into a local folder."""
    tmp = tmp_path_factory.mktemp("s3-pipeline")
    src = _movielens_like_source(tmp / "raw")
    root = f"s3://{_bucket(s3_endpoint)}?endpoint_override={s3_endpoint}&scheme=http"
    run = storage.join(root, "runs", "ml")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(storage.CACHE_ENV, str(tmp / "cache"))

        def pipeline(out: str) -> tuple[int, float]:
            t0 = time.perf_counter()
            rc = cli_main(
                [
                    "--log-level",
                    "WARNING",
                    "pipeline",
                    "--dataset",
                    "movielens-latest-small",
                    "--source",
                    str(src),
                    "--out",
                    out,
                    "--stages",
                    "prepare,embed,index",
                    "--model",
                    tiny_model_dir,
                ]
            )
            return rc, time.perf_counter() - t0

        rc1, t1 = pipeline(run)
        first = {k: v for k, v in _remote_files(run).items()}
        rc2, t2 = pipeline(run)
        rc_local, t_local = pipeline(str(tmp / "local-run"))
        print(f"[s3 pipeline] first run {t1:.1f}s, re-run {t2:.2f}s, local run {t_local:.1f}s")
        yield {
            "root": root,  # the bucket: other tests write next to runs/ml, never into it
            "run": run,
            "tmp": tmp,
            "src": src,
            "first": first,
            "rc": (rc1, rc2, rc_local),
            "times": (t1, t2, t_local),
            "local": tmp / "local-run",
        }


def test_s3_pipeline_writes_complete_artifacts(s3_pipeline: dict[str, Any]) -> None:
    assert s3_pipeline["rc"] == (0, 0, 0)
    files = s3_pipeline["first"]
    for part, main_file in (
        ("data", "items.parquet"),
        ("embeddings", json.loads(files["embeddings/meta.json"])["parts_prefix"]),  # written by the workers
        ("index", "item_ids.npy"),
    ):
        assert f"{part}/meta.json" in files and any(
            f.startswith(f"{part}/{main_file}") for f in files
        ), sorted(files)
        assert (
            json.loads(files[f"{part}/meta.json"])["stage"]
            == {"data": "prepare", "embeddings": "embed", "index": "index"}[part]
        )
    assert "pipeline.json" in files
    assert not [f for f in files if f.endswith(storage.INCOMPLETE_MARK)]


def test_s3_pipeline_rerun_reuses_every_stage(s3_pipeline: dict[str, Any]) -> None:
    assert _remote_files(s3_pipeline["run"]) == s3_pipeline["first"]  # nothing rewritten: same meta bytes
    t1, t2, _ = s3_pipeline["times"]
    assert t2 < min(5.0, t1 / 3), s3_pipeline["times"]


def test_s3_embeddings_equal_a_local_run(s3_pipeline: dict[str, Any], tmp_path: Path) -> None:
    from llmrec.embed.artifact import load_embeddings

    staged = storage.stage_in(storage.join(s3_pipeline["run"], "embeddings"), tmp_path / "fresh-cache")
    remote, local = load_embeddings(staged), load_embeddings(s3_pipeline["local"] / "embeddings")
    assert list(remote.item_ids) == list(local.item_ids)
    np.testing.assert_array_equal(remote.vectors, local.vectors)
    for part in ("data", "embeddings"):
        r = json.loads(s3_pipeline["first"][f"{part}/meta.json"])
        loc = json.loads((s3_pipeline["local"] / part / "meta.json").read_text())
        assert r.get("fingerprint") == loc.get("fingerprint") and r.get("n_items") == loc.get("n_items")


def test_s3_recommend_reads_run_and_writes_file(
    s3_pipeline: dict[str, Any], tmp_path: Path, monkeypatch
) -> None:
    """`llmrec recommend` with the run, the users file and the output on S3 (a baseline: no training)."""
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    run = s3_pipeline["run"]
    users = storage.join(run, "users.txt")
    storage.write_bytes(users, b"u0000\nu0001\n")
    out = storage.join(run, "recs", "popularity.parquet")
    assert (
        cli_main(
            ["recommend", "--run", run, "--users", users, "--model", "popularity", "--k", "5", "--out", out]
        )
        == 0
    )
    recs = pd.read_parquet(storage.stage_in(out, tmp_path / "c2"))
    assert sorted(recs["user_id"].unique()) == ["u0000", "u0001"] and len(recs) == 10


def test_s3_failed_stage_uploads_nothing(s3_pipeline: dict[str, Any], tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    run = s3_pipeline["run"]
    out = storage.join(run, "index-bad")
    assert cli_main(["index", "--embeddings", storage.join(run, "data"), "--out", out]) == 2
    assert not storage.exists(out)
    # and a failed re-run of an existing stage leaves its previous artifact untouched
    before = _remote_files(storage.join(run, "index"))
    assert (
        cli_main(["index", "--embeddings", storage.join(run, "data"), "--out", storage.join(run, "index")])
        == 2
    )
    assert _remote_files(storage.join(run, "index")) == before


# ------------------------------------------------------------------- S3: train, evaluate, replay, index --add

_SMALL_TRAIN = ["--epochs", "1", "--dim", "16", "--max-len", "10", "--batch-size", "32", "--patience", "5"]


def _copy_run(src: str, dst: str, parts: tuple[str, ...] = ("data", "embeddings", "index")) -> None:
    """Server-side copy of some artifact folders of a remote run (so a test can write into its own run)."""
    fs, s = storage.filesystem_for(src)
    _, d = storage.filesystem_for(dst)
    for part in parts:
        for rel, info in staging._list_files(fs, f"{s}/{part}"):
            fs.copy_file(info.path, f"{d}/{part}/{rel}")


def _copy_local_run(src: Path, dst: Path, parts: tuple[str, ...] = ("data", "embeddings", "index")) -> Path:
    import shutil

    for part in parts:
        shutil.copytree(src / part, dst / part)
    return dst


def _event_log(folder: Path, items: list[str]) -> Path:
    """A serving event log (llmrec.state.event_log layout: JSONL segments, no meta.json) with two likes."""
    from llmrec.state.event_log import EventLog
    from llmrec.state.user_state import Event

    with EventLog(folder, shard=0) as log:
        log.append(
            [
                Event(event_id=f"e{i}", user_id="u0000", item_id=item, event="like", ts=2e9 + i)
                for i, item in enumerate(items)
            ]
        )
    return folder


def test_s3_train_writes_a_scorer(s3_pipeline: dict[str, Any], tmp_path: Path, monkeypatch, caplog) -> None:
    """`llmrec train`, --data, --embeddings, --events and --out on S3: the real Ray Train path, 1 epoch."""
    import torch

    from llmrec.embed.artifact import load_embeddings
    from llmrec.scorer.inference import Scorer

    torch.set_num_threads(1)
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    run, out = s3_pipeline["run"], storage.join(s3_pipeline["root"], "train-cli", "scorer")
    items = list(load_embeddings(s3_pipeline["local"] / "embeddings").item_ids[:2])
    events = storage.join(s3_pipeline["root"], "train-cli", "events")
    with storage.stage_out(events, tmp_path / "w") as local:  # uploaded as is: a log has no meta.json
        _event_log(local, items)
    caplog.set_level(logging.INFO, logger="llmrec.commands.train")
    argv = ["train", "--data", storage.join(run, "data"), "--embeddings", storage.join(run, "embeddings")]
    t0 = time.perf_counter()
    assert cli_main([*argv, "--events", events, "--out", out, *_SMALL_TRAIN]) == 0
    print(f"[s3 train] {time.perf_counter() - t0:.1f}s")
    assert "added 2 events from the serving log" in caplog.text
    files = _remote_files(out)
    for name in ("meta.json", "model.pt", "item_ids.npy", "last_checkpoint/checkpoint.pt"):
        assert name in files, sorted(files)
    assert not [f for f in files if f.endswith(storage.INCOMPLETE_MARK)]
    meta = json.loads(files["meta.json"])
    assert meta["stage"] == "train" and meta["epochs_run"] == [0] and meta["n_items"] == 60
    scorer = Scorer.load(storage.stage_in(out, tmp_path / "reader", stage="train"))
    assert scorer.n_items == 60


def test_s3_evaluate_matches_a_local_run(s3_pipeline: dict[str, Any], tmp_path: Path, monkeypatch) -> None:
    """`llmrec evaluate` with --data, --run and --out on S3 (baselines only, no training) = a local run."""
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    run, local = s3_pipeline["run"], s3_pipeline["local"]
    out = storage.join(s3_pipeline["root"], "eval-cli", "eval")
    flags = ["--models", "popularity,itemknn,zeroshot_text", "--max-test-users", "6", "--seed", "1"]
    rc = cli_main(["evaluate", "--data", storage.join(run, "data"), "--run", run, "--out", out, *flags])
    assert rc == 0
    rc = cli_main(["evaluate", "--data", str(local / "data"), "--run", str(local), "--out",
                   str(tmp_path / "eval"), *flags])
    assert rc == 0
    files = _remote_files(out)
    assert {"meta.json", "metrics.json", "report.md"} <= set(files), sorted(files)
    assert json.loads(files["meta.json"])["stage"] == "evaluate"
    remote_m = json.loads(files["metrics.json"])
    local_m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    for proto in ("loo", "time"):
        assert remote_m[proto]["models"] == local_m[proto]["models"]
        assert remote_m[proto]["n_users"] == local_m[proto]["n_users"] <= 6


def test_s3_replay_adds_replay_json_and_eval_stays_replaceable(
    s3_pipeline: dict[str, Any], tmp_path: Path, monkeypatch
) -> None:
    """`llmrec replay --run s3://...` (no evaluation yet) writes RUN/eval/replay.json on S3, equal to a local
    replay; `llmrec evaluate --out RUN/eval` may then still replace that folder (it holds no meta.json)."""
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    run = storage.join(s3_pipeline["root"], "runs", "replay")
    _copy_run(s3_pipeline["run"], run)
    local = _copy_local_run(s3_pipeline["local"], tmp_path / "local-run")
    assert cli_main(["replay", "--run", run, "--data", storage.join(run, "data"), "--max-events", "0"]) == 0
    assert cli_main(["replay", "--run", str(local), "--data", str(local / "data"), "--max-events", "0"]) == 0
    files = _remote_files(storage.join(run, "eval"))
    assert sorted(files) == [storage.ADDED_MARK, "replay.json"]  # added by replay: no meta.json yet
    remote_r = json.loads(files["replay.json"])
    local_r = json.loads((local / "eval" / "replay.json").read_text())
    assert remote_r["n_targets"] == local_r["n_targets"] > 0
    for m in ("online", "frozen", "gain"):
        assert remote_r[m] == local_r[m], m
    # the eval folder is llmrec's own: evaluate replaces it (as a whole, so replay.json goes)
    rc = cli_main(["evaluate", "--data", storage.join(run, "data"), "--run", run, "--out",
                   storage.join(run, "eval"), "--models", "popularity", "--protocol", "loo"])
    assert rc == 0
    evaluated = _remote_files(storage.join(run, "eval"))
    assert {"meta.json", "metrics.json", "report.md"} <= set(evaluated), sorted(evaluated)
    assert not {"replay.json", storage.ADDED_MARK} & set(evaluated)
    # replay after evaluate adds replay.json next to the evaluation, which stays a complete artifact
    assert cli_main(["replay", "--run", run, "--data", storage.join(run, "data"), "--max-events", "5"]) == 0
    after = _remote_files(storage.join(run, "eval"))
    assert sorted(after) == sorted([*evaluated, "replay.json"])
    assert {k: after[k] for k in evaluated} == evaluated


def test_s3_index_add_embeddings_matches_local(
    s3_pipeline: dict[str, Any], tmp_path: Path, monkeypatch
) -> None:
    """`llmrec index --add-embeddings s3://... --out s3://...` updates the remote index as a local one."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from llmrec.embed.artifact import load_embeddings
    from llmrec.index.item_index import ItemIndex

    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    root, local_run = storage.join(s3_pipeline["root"], "index-add"), s3_pipeline["local"]
    # a second embeddings artifact from the same encoder: 5 new items (the first 5 vectors, new ids), in the
    # single-file layout of older runs
    new = tmp_path / "new-emb"
    new.mkdir()
    e = load_embeddings(local_run / "embeddings")
    t = pa.table({"item_id": [f"new-{i}" for i in e.item_ids[:5]],
                  "embedding": pa.FixedSizeListArray.from_arrays(pa.array(e.vectors[:5].ravel()), e.dim)})
    pq.write_table(t, new / "embeddings.parquet")
    meta = json.loads((local_run / "embeddings" / "meta.json").read_text())
    meta = {k: v for k, v in meta.items() if k not in ("parts_prefix", "n_parts")}
    (new / "meta.json").write_text(json.dumps({**meta, "n_items": 5}))
    with storage.stage_out(storage.join(root, "new-emb"), tmp_path / "w") as up:
        for p in new.iterdir():
            (up / p.name).write_bytes(p.read_bytes())
    index = storage.join(root, "index")
    assert cli_main(["index", "--embeddings", storage.join(s3_pipeline["run"], "embeddings"), "--out", index,
                     "--kind", "flat"]) == 0
    assert cli_main(["index", "--add-embeddings", storage.join(root, "new-emb"), "--out", index]) == 0
    # the same two steps locally
    local_index = tmp_path / "index"
    assert cli_main(["index", "--embeddings", str(local_run / "embeddings"), "--out", str(local_index),
                     "--kind", "flat"]) == 0
    assert cli_main(["index", "--add-embeddings", str(new), "--out", str(local_index)]) == 0
    files = _remote_files(index)
    remote_meta = json.loads(files["meta.json"])
    assert remote_meta["n_items"] == 65 and [a["n_added"] for a in remote_meta["added"]] == [5]
    remote = ItemIndex.load(storage.stage_in(index, tmp_path / "reader", stage="index"), device="cpu")
    loc = ItemIndex.load(local_index, device="cpu")
    assert list(remote.item_ids) == list(loc.item_ids) and list(remote.item_ids)[-5:][0].startswith("new-")
    assert {k: v for k, v in files.items() if k != "meta.json"} == {
        p.relative_to(local_index).as_posix(): p.read_bytes()
        for p in local_index.rglob("*") if p.is_file() and p.name != "meta.json"
    }
    # adding the same items again is refused and leaves the remote index as it was
    assert cli_main(["index", "--add-embeddings", storage.join(root, "new-emb"), "--out", index]) == 2
    assert _remote_files(index) == files


# ---------------------------------------------- S3, slow: a trained run (pipeline train,evaluate), serve


@pytest.fixture(scope="module")
def s3_trained(
    s3_pipeline: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """`llmrec pipeline --stages train,evaluate --epochs 1` on a copy of the S3 run and of the local run."""
    import torch

    torch.set_num_threads(1)  # the baselines evaluate fits in this process (SASRec)
    tmp = tmp_path_factory.mktemp("s3-trained")
    run = storage.join(s3_pipeline["root"], "runs", "trained")
    _copy_run(s3_pipeline["run"], run)
    local = _copy_local_run(s3_pipeline["local"], tmp / "local-run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(storage.CACHE_ENV, str(tmp / "cache"))

        def pipeline(out: str) -> tuple[int, float]:
            t0 = time.perf_counter()
            rc = cli_main(["--log-level", "WARNING", "pipeline", "--dataset", "movielens-latest-small",
                           "--source", str(s3_pipeline["src"]), "--out", out, "--stages", "train,evaluate",
                           "--epochs", "1", "--max-test-users", "6"])
            return rc, time.perf_counter() - t0

        rc1, t1 = pipeline(run)
        first = _remote_files(run)
        rc2, t2 = pipeline(run)
        rc_local, t_local = pipeline(str(local))
        print(f"[s3 train,evaluate] first run {t1:.1f}s, re-run {t2:.2f}s, local run {t_local:.1f}s")
        yield {
            "root": s3_pipeline["root"],
            "run": run,
            "local": local,
            "tmp": tmp,
            "first": first,
            "rc": (rc1, rc2, rc_local),
            "times": (t1, t2, t_local),
        }


@pytest.mark.slow
def test_s3_train_evaluate_pipeline_matches_local(s3_trained: dict[str, Any]) -> None:
    import torch

    assert s3_trained["rc"] == (0, 0, 0)
    files, local = s3_trained["first"], s3_trained["local"]
    for part, stage, main_file in (("scorer", "train", "model.pt"), ("eval", "evaluate", "metrics.json")):
        assert f"{part}/meta.json" in files and f"{part}/{main_file}" in files, sorted(files)
        assert json.loads(files[f"{part}/meta.json"])["stage"] == stage
    assert {"train", "evaluate"} <= set(json.loads(files["pipeline.json"]))
    assert "eval/report.md" in files and not [f for f in files if f.endswith(storage.INCOMPLETE_MARK)]
    # the re-run reuses both stages: nothing rewritten
    assert _remote_files(s3_trained["run"]) == files
    assert s3_trained["times"][1] < min(5.0, s3_trained["times"][0] / 3), s3_trained["times"]
    # seeded single-worker training: the same weights as the local run, and the same evaluation
    remote_sd = torch.load(io.BytesIO(files["scorer/model.pt"]), map_location="cpu", weights_only=True)
    local_sd = torch.load(local / "scorer" / "model.pt", map_location="cpu", weights_only=True)
    assert remote_sd["model_config"] == local_sd["model_config"]
    for name, tensor in local_sd["model"].items():
        torch.testing.assert_close(remote_sd["model"][name], tensor, rtol=0, atol=0, msg=name)
    remote_m = json.loads(files["eval/metrics.json"])
    local_m = json.loads((local / "eval" / "metrics.json").read_text())
    assert set(remote_m) == set(local_m) == {"loo"}  # the pipeline's evaluation is `evaluate --fast`
    for proto in remote_m:
        assert "llmrec" in remote_m[proto]["models"]
        assert remote_m[proto]["tuning"]["llmrec"]["reused_run_scorer"] is True  # the --holdout loo scorer
        assert remote_m[proto]["models"] == local_m[proto]["models"], proto


@pytest.mark.slow
def test_s3_recommend_llmrec_matches_local(s3_trained: dict[str, Any], tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    run, local = s3_trained["run"], s3_trained["local"]
    users = storage.join(run, "users.txt")
    storage.write_bytes(users, b"u0003\nu0000\n")
    out = storage.join(run, "recs", "llmrec.parquet")
    assert cli_main(["recommend", "--run", run, "--users", users, "--k", "5", "--out", out]) == 0
    (tmp_path / "users.txt").write_bytes(b"u0003\nu0000\n")
    assert cli_main(["recommend", "--run", str(local), "--users", str(tmp_path / "users.txt"), "--k", "5",
                     "--out", str(tmp_path / "llmrec.parquet")]) == 0
    remote = pd.read_parquet(storage.stage_in(out, tmp_path / "c2"))
    assert remote["user_id"].tolist() == ["u0003"] * 5 + ["u0000"] * 5
    pd.testing.assert_frame_equal(remote, pd.read_parquet(tmp_path / "llmrec.parquet"))
    # a folder on S3: the workers' parts moved in; a second write replaces the first one's parts
    folder = storage.join(run, "recs", "parts")
    listings = []
    for _ in range(2):
        assert cli_main(["recommend", "--run", run, "--users", users, "--k", "5", "--out", folder,
                         "--users-per-shard", "1"]) == 0
        listings.append(set(_remote_files(folder)))
    assert listings[1] and not listings[0] & listings[1], listings  # new part names, the old ones gone
    assert all(name.endswith(".parquet") for name in listings[1]), listings
    assert not [f for f in _remote_files(storage.join(run, "recs")) if ".llmrec-recs-" in f]  # staging gone
    parts = pd.concat(pd.read_parquet(io.BytesIO(b)) for b in _remote_files(folder).values())
    key = ["user_id", "rank"]
    pd.testing.assert_frame_equal(parts.sort_values(key, ignore_index=True),
                                  remote.sort_values(key, ignore_index=True))


@pytest.mark.slow
def test_s3_replay_on_a_trained_run_matches_local(
    s3_trained: dict[str, Any], tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    run, local = s3_trained["run"], s3_trained["local"]
    before = _remote_files(storage.join(run, "eval"))
    assert cli_main(["replay", "--run", run, "--data", storage.join(run, "data"), "--max-events", "0"]) == 0
    assert cli_main(["replay", "--run", str(local), "--data", str(local / "data"), "--max-events", "0",
                     "--out", str(tmp_path / "replay")]) == 0
    after = _remote_files(storage.join(run, "eval"))
    assert sorted(after) == sorted([*before, "replay.json"]) and {k: after[k] for k in before} == before
    remote_r = json.loads(after["replay.json"])
    local_r = json.loads((tmp_path / "replay" / "replay.json").read_text())
    assert remote_r["scorer"] == local_r["scorer"] and remote_r["n_targets"] == local_r["n_targets"] > 0
    for m in ("online", "frozen", "gain"):
        assert remote_r[m] == local_r[m], m


@pytest.mark.slow
def test_s3_train_resumes_from_a_uri(s3_trained: dict[str, Any], tmp_path: Path, monkeypatch) -> None:
    """`llmrec train --resume s3://RUN/scorer`: the staged scorer's last checkpoint, one more epoch."""
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    run = s3_trained["run"]
    out = storage.join(s3_trained["root"], "resumed", "scorer")
    inputs = ["--data", storage.join(run, "data"), "--embeddings", storage.join(run, "embeddings")]
    rc = cli_main(["train", *inputs, "--resume", storage.join(run, "scorer"), "--epochs", "2", "--out", out])
    assert rc == 0
    meta = json.loads(storage.read_bytes(storage.join(out, "meta.json")))
    assert meta["stage"] == "train" and meta["epochs_run"] == [1] and meta["config"]["resumed_from"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_s3_serve_feedback_then_recommend(s3_trained: dict[str, Any], tmp_path: Path) -> None:
    """`llmrec serve --run s3://... --events DIR` as the README starts it: /feedback, /recommend, Ctrl-C."""
    import os
    import signal
    import subprocess
    import sys

    import requests

    run, port, events = s3_trained["run"], _free_port(), tmp_path / "events"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, as a user's
    env[storage.CACHE_ENV] = str(tmp_path / "c")
    log = tmp_path / "serve.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llmrec", "serve", "--run", run, "--events", str(events),
             "--port", str(port), "--shards", "2"],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, f"serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}"
            try:
                health = requests.get(f"{url}/healthz", timeout=5)
                if health.status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, f"serve not ready:\n{log.read_text()[-4000:]}"
            time.sleep(1.0)
        t_ready = time.perf_counter() - t0
        assert health.json()["n_items"] == 60
        liked = pd.read_parquet(s3_trained["local"] / "data" / "items.parquet")["item_id"].iloc[0]
        event = {"user_id": "alice", "item_id": liked, "event": "like"}
        r = requests.post(f"{url}/feedback", json=event, timeout=30)
        assert r.status_code == 200 and r.json()["ok"], r.text
        r = requests.get(f"{url}/recommend", params={"user_id": "alice", "k": 5}, timeout=30)
        assert r.status_code == 200, r.text
        items = [i["item_id"] for i in r.json()["items"]]
        assert len(items) == 5 and liked not in items and r.json()["state_version"] >= 1
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C: the command deletes the app and stops its Ray
        try:
            rc = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    print(f"[s3 serve] ready in {t_ready:.1f}s, total {time.perf_counter() - t0:.1f}s")
    assert rc == 0, log.read_text()[-4000:]
    logged = "".join(p.read_text() for p in events.glob("s*.jsonl"))
    assert f'"item_id": "{liked}"' in logged or f'"item_id":"{liked}"' in logged, logged


def test_remote_keys_with_dot_dot_cannot_write_outside_the_cache(tmp_path: Path) -> None:
    import fsspec

    mem = fsspec.filesystem("memory")
    root = f"/llmrec-test-{uuid.uuid4().hex[:8]}"
    mem.pipe(f"{root}/art/meta.json", b'{"stage": "embed"}')
    mem.pipe(f"{root}/art/ok.txt", b"fine")
    mem.pipe(f"{root}/art/sub/../../../../escaped.txt", b"pwned")
    cache = tmp_path / "deep" / "cache"
    with pytest.raises(ValueError, match=r"not a plain relative path .*refusing to download it outside"):
        storage.stage_in(f"memory://{root.lstrip('/')}/art", cache, stage="embed")
    assert not list(tmp_path.rglob("escaped.txt"))
