"""`llmrec pipeline` reuses a stage when its inputs are the same, however they are spelled (relative or
absolute run folder and source), and prepares again when the source data changed; a missing data folder is
reported with where it was looked for and where the dataset comes from.

Reference: the bytes of RUN/data/meta.json (rewritten by every prepare: it records created_at) before and
after a re-run, and the log line the pipeline prints for a reused stage.
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

import pytest

from llmrec.cli import main as cli_main
from llmrec.commands.pipeline import normalised_argv, stage_argv


@pytest.fixture()
def small_movielens(data_dir: Path, tmp_path: Path) -> Path:
    """MovieLens latest-small with the first 3,000 ratings (prepare takes a few seconds)."""
    src = tmp_path / "data" / "movielens-latest-small"
    src.mkdir(parents=True)
    orig = data_dir / "movielens-latest-small"
    for name in ("movies.csv", "tags.csv"):
        shutil.copy(orig / name, src / name)
    lines = (orig / "ratings.csv").read_text().splitlines(keepends=True)
    (src / "ratings.csv").write_text("".join(lines[:3001]))
    return src


def _prepare(source: str, out: str) -> int:
    return cli_main(["pipeline", "--dataset", "movielens-latest-small", "--source", source, "--out", out,
                     "--stages", "prepare"])


def test_same_data_by_another_path_is_reused_changed_data_is_not(
    small_movielens: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    meta = tmp_path / "runs" / "ml" / "data" / "meta.json"
    assert _prepare("data/movielens-latest-small", "runs/ml") == 0  # relative, as `make run` spells them
    first = meta.read_bytes()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="llmrec.commands.pipeline"):
        assert _prepare(str(small_movielens.resolve()), str((tmp_path / "runs" / "ml").resolve())) == 0
    assert meta.read_bytes() == first, "prepare ran again for the same data under an absolute path"
    assert "[prepare] reusing" in caplog.text
    # the same bytes elsewhere (a copy) are the same data
    copy = tmp_path / "elsewhere"
    shutil.copytree(small_movielens, copy)
    assert _prepare(str(copy), "./runs/ml/") == 0
    assert meta.read_bytes() == first
    # edited data is prepared again
    with open(copy / "tags.csv", "a") as f:
        f.write("1,1,an added tag,1500000000\n")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="llmrec.commands.pipeline"):
        assert _prepare(str(copy), "runs/ml") == 0
    assert meta.read_bytes() != first and "changed since RUN/data was prepared" in caplog.text


def test_stage_argv_spellings_normalise_alike(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)

    def argvs(source: str, out: str, model: str | None = None) -> dict[str, list[str]]:
        args = argparse.Namespace(dataset="movielens-latest-small", source=source, out=out, model=model,
                                  batch_size=None, address=None, index_kind="auto", num_workers=None,
                                  epochs=5, max_test_users=None)
        return {k: normalised_argv(v) for k, v in stage_argv(args, out).items()}

    rel = argvs("../shared/data/ml", "runs/ml")
    assert rel == argvs("/elsewhere/ml", str(tmp_path / "runs" / "ml"))
    assert rel == argvs("ml", "./runs/ml/")
    assert rel["evaluate"] == ["evaluate", "--data", "RUN/data", "--run", "RUN", "--out", "RUN/eval",
                                "--fast"]
    assert rel["prepare"][3:5] == ["--source", "<source>"]  # compared by content (source_unchanged)
    # a different run folder, model or flag is a different input
    assert argvs("ml", "runs/other")["embed"] == rel["embed"]  # RUN-relative: the folder's own artifacts
    assert argvs("ml", "runs/ml", model="org/model")["embed"] != rel["embed"]
    assert argvs("ml", "runs/ml")["train"] == rel["train"]
    uri = argvs("ml", "s3://bucket/runs/ml")
    assert uri["index"] == rel["index"] and uri["prepare"] == rel["prepare"]
    s3_src = argvs("s3://bucket/raw/ml", "runs/ml")["prepare"]
    assert s3_src[4] == "s3://bucket/raw/ml"  # a URI source is compared by its text


@pytest.mark.parametrize("dataset, page", [
    ("movielens-latest-small", "https://grouplens.org/datasets/movielens/latest/"),
    ("amazon-magazine-subscriptions-2018", "https://cseweb.ucsd.edu/~jmcauley/datasets/amazon_v2/"),
    ("amazon-scientific-unisrec", "https://github.com/RUCAIBox/UniSRec"),
    ("mind-small-sample", "https://msnews.github.io/"),
])
def test_missing_data_folder_names_the_dataset_page(
    dataset: str, page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    rc = cli_main(["prepare", "--dataset", dataset, "--source", "no-such-folder", "--out", "out"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert page in err and str(tmp_path / "no-such-folder") in err, err
    (tmp_path / "empty").mkdir()
    rc = cli_main(["prepare", "--dataset", dataset, "--source", "empty", "--out", "out"])
    err = capsys.readouterr().err
    assert rc == 2 and "is missing" in err and page in err and str(tmp_path / "empty") in err, err
