"""embed_catalog on Ray Data == TextEncoder.encode in-process, row order kept; artifact load; input errors."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmrec.artifacts import ArtifactError, file_fingerprint, write_meta
from llmrec.embed.artifact import load_embeddings
from llmrec.embed.encoder import TextEncoder
from llmrec.embed.ray_embed import embed_catalog, plan_actors
from llmrec.schema import EMBEDDING, EMBEDDINGS_FILE, ITEM_ID, ITEMS_FILE, META_FILE, TEXT


def _movies(data_dir: Path, n: int, seed: int = 0) -> pd.DataFrame:
    """n MovieLens movies (a seeded sample, shuffled so file order != id order) as a canonical items table."""
    with open(data_dir / "movielens-latest-small" / "movies.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    pick = np.random.default_rng(seed).choice(len(rows), size=n, replace=False)
    df = pd.DataFrame([rows[i] for i in pick])
    return pd.DataFrame(
        {
            ITEM_ID: df["movieId"].astype(str),
            TEXT: df["title"] + " " + df["genres"].str.replace("|", ", "),
            "title": df["title"],
        }
    )


@pytest.fixture(scope="module")
def items_dir(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    d = tmp_path_factory.mktemp("prepared")
    df = _movies(data_dir, 300)
    df.loc[7, TEXT] = "a very long description " * 40  # exercises truncation at max_length
    df.to_parquet(d / ITEMS_FILE, index=False)
    write_meta(d, "prepare", fingerprint="f00dfeed", n_items=len(df))  # as `llmrec prepare` writes it
    return d


@pytest.mark.timeout(300)  # ~15 s alone; the 2 cores are shared
def test_ray_pipeline_equals_in_process_encode(
    ray_local, items_dir: Path, tiny_model_dir: str, tmp_path: Path
) -> None:
    out = tmp_path / "emb"
    meta = embed_catalog(items_dir, out, model=tiny_model_dir, batch_size=16, max_length=32, device="cpu")
    items = pd.read_parquet(items_dir / ITEMS_FILE)

    emb = load_embeddings(out)
    assert list(emb.item_ids) == list(items[ITEM_ID])  # same row order as items.parquet
    assert emb.vectors.shape == (300, 32) and emb.vectors.dtype == np.float32
    ref = TextEncoder(tiny_model_dir, device="cpu", max_length=32).encode(list(items[TEXT]), batch_size=64)
    np.testing.assert_allclose(emb.vectors, ref, atol=1e-5)

    # parquet schema per design: item_id string, embedding fixed_size_list<float32>[D]
    schema = pq.read_schema(out / EMBEDDINGS_FILE)
    assert schema.field(ITEM_ID).type == pa.string()
    assert schema.field(EMBEDDING).type == pa.list_(pa.float32(), 32)

    for k, v in {
        "model_name": str(Path(tiny_model_dir).resolve()),
        "dim": 32,
        "normalized": True,
        "max_length": 32,
        "pooling": "mean",
        "n_items": 300,
        "batch_size": 16,
        "device": "cpu",
        "num_actors": 2,
        "stage": "embed",
        "bucketing": "dataset",
    }.items():
        assert meta[k] == v, (k, meta[k], v)
    assert meta["wall_s"] > 0 and meta["items_per_s"] == pytest.approx(300 / meta["wall_s"], rel=0.01)
    # length bucketing: less padding than batching the same rows in file order (hand-computed reference)
    lengths = TextEncoder(tiny_model_dir, device="cpu", max_length=32).tokenize(list(items[TEXT]))["length"]
    unsorted = lengths.sum() / sum(len(b) * b.max() for b in np.array_split(lengths, range(16, 300, 16)))
    assert unsorted + 0.1 < meta["padding_efficiency"] <= 1, (unsorted, meta["padding_efficiency"])
    assert json.loads((out / META_FILE).read_text())["dataset_fingerprint"] == "f00dfeed"  # the prepare one
    assert meta["items_sha256"] == file_fingerprint([items_dir / ITEMS_FILE])
    assert 0 < meta["first_batch_s"] < meta["wall_s"]


@pytest.mark.timeout(300)  # ~15 s alone; the 2 cores are shared
def test_cli_embed_command(ray_local, items_dir: Path, tiny_model_dir: str, tmp_path: Path, capsys) -> None:
    from llmrec.commands import embed as cmd

    p = argparse.ArgumentParser()
    cmd.add_arguments(p)
    out = tmp_path / "emb"
    args = p.parse_args(
        [
            "--items",
            str(items_dir / ITEMS_FILE),
            "--out",
            str(out),
            "--model",
            tiny_model_dir,
            "--batch-size",
            "64",
            "--max-length",
            "16",
            "--num-actors",
            "1",
            "--device",
            "cpu",
            "--bucketing",
            "group",
        ]
    )
    assert cmd.run(args) == 0
    printed = capsys.readouterr().out
    assert "wrote 300 x 32 embeddings" in printed and "items/s" in printed and str(out) in printed
    emb = load_embeddings(out)
    assert emb.meta["num_actors"] == 1 and emb.meta["max_length"] == 16 and emb.meta["bucketing"] == "group"
    assert list(emb.item_ids) == list(pd.read_parquet(items_dir / ITEMS_FILE)[ITEM_ID])
    items = pd.read_parquet(items_dir / ITEMS_FILE)
    ref = TextEncoder(tiny_model_dir, device="cpu", max_length=16).encode(list(items[TEXT][:50]))
    np.testing.assert_allclose(emb.vectors[:50], ref, atol=1e-5)


def _write(tmp_path: Path, df: pd.DataFrame) -> Path:
    f = tmp_path / "items.parquet"
    df.to_parquet(f, index=False)
    return f


def test_catalog_errors_are_clear(tmp_path: Path, tiny_model_dir: str) -> None:
    # every check runs on the driver before Ray starts
    no_text = _write(tmp_path, pd.DataFrame({ITEM_ID: ["1", "2"], "title": ["a", "b"]}))
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['text'\].*got columns \['item_id', 'title'\]"):
        embed_catalog(no_text, tmp_path / "o", model=tiny_model_dir)
    dup = _write(tmp_path, pd.DataFrame({ITEM_ID: ["1", "2", "1"], TEXT: ["a", "b", "c"]}))
    with pytest.raises(ValueError, match=r"1 duplicated 'item_id'.*\['1'\]"):
        embed_catalog(dup, tmp_path / "o", model=tiny_model_dir)
    null_text = _write(tmp_path, pd.DataFrame({ITEM_ID: ["1", "2"], TEXT: ["a", None]}))
    with pytest.raises(ValueError, match=r"1 null value\(s\) in 'text' \(first at row 1\)"):
        embed_catalog(null_text, tmp_path / "o", model=tiny_model_dir)
    int_ids = _write(tmp_path, pd.DataFrame({ITEM_ID: [1, 2], TEXT: ["a", "b"]}))
    with pytest.raises(ValueError, match="column 'item_id' must be string, got int64"):
        embed_catalog(int_ids, tmp_path / "o", model=tiny_model_dir)
    empty = _write(
        tmp_path, pd.DataFrame({ITEM_ID: pd.Series([], dtype=str), TEXT: pd.Series([], dtype=str)})
    )
    with pytest.raises(ValueError, match="has no rows"):
        embed_catalog(empty, tmp_path / "o", model=tiny_model_dir)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        embed_catalog(tmp_path / "nope.parquet", tmp_path / "o", model=tiny_model_dir)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match="folder without items.parquet"):
        embed_catalog(tmp_path / "empty_dir", tmp_path / "o", model=tiny_model_dir)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        embed_catalog(no_text, tmp_path / "o", batch_size=0)


def test_plan_actors_never_starves_read_tasks() -> None:
    p = plan_actors(2, 0)  # this machine: 2 actors x 0.5 CPU leaves 1 CPU for reads (PLATFORM.md G3)
    assert (p["num_actors"], p["num_cpus"], p["device"], p["fp16"], p["torch_threads"]) == (
        2,
        0.5,
        "cpu",
        False,
        1,
    )
    for cpus in (1, 2, 3, 4, 16, 64):
        for k in (None, 1, 2, 8):
            p = plan_actors(cpus, 0, num_actors=k)
            assert p["num_actors"] * p["num_cpus"] <= cpus - 1 + 1e-9, (cpus, k, p)
            assert p["num_actors"] == (k or p["num_actors"])
    assert plan_actors(16, 0)["num_actors"] == 16
    g = plan_actors(16, 4)
    assert (g["num_actors"], g["num_gpus"], g["device"], g["fp16"]) == (4, 1, "cuda", True)
    assert plan_actors(16, 4, device="cpu")["device"] == "cpu"
    with pytest.raises(ValueError, match="the Ray cluster has no GPU"):
        plan_actors(2, 0, device="cuda")
    with pytest.raises(ValueError, match="need 8 GPUs, the cluster has 4"):
        plan_actors(16, 4, num_actors=8)


def test_load_embeddings_checks_meta(tmp_path: Path) -> None:
    vecs = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    table = pa.table(
        {
            ITEM_ID: pa.array(list("abcde")),
            EMBEDDING: pa.FixedSizeListArray.from_arrays(pa.array(vecs.ravel()), 4),
        }
    )
    pq.write_table(table, tmp_path / EMBEDDINGS_FILE)
    write_meta(tmp_path, "embed", model_name="m", dim=4, n_items=5, normalized=False)
    e = load_embeddings(tmp_path)
    np.testing.assert_array_equal(e.vectors, vecs)
    assert list(e.item_ids) == list("abcde") and e.dim == 4 and len(e) == 5
    write_meta(tmp_path, "embed", model_name="m", dim=4, n_items=6, normalized=False)
    with pytest.raises(ArtifactError, match="holds 5 rows of dim 4, its meta.json says n_items=6"):
        load_embeddings(tmp_path)
    write_meta(tmp_path, "index", dim=4)
    with pytest.raises(ArtifactError, match="expected a 'embed' artifact"):
        load_embeddings(tmp_path)
