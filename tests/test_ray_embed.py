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
from llmrec.embed.artifact import embedding_files, iter_embeddings, load_embeddings, read_item_ids
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
def test_ray_pipeline_equals_in_process_encode_and_replaces_the_old_version(
    ray_local, items_dir: Path, tiny_model_dir: str, tmp_path: Path
) -> None:
    out = tmp_path / "emb"
    out.mkdir()
    # an earlier sharded version (another write id): replaced as a whole once the new meta.json is written
    pq.write_table(
        pa.table(
            {
                ITEM_ID: ["x", "y", "z"],
                EMBEDDING: pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(3 * 32, np.float32)), 32),
            }
        ),
        out / "part-0ld0ld00-000000-u-0.parquet",
    )
    write_meta(out, "embed", model_name="old", dim=32, n_items=3, parts_prefix="part-0ld0ld00-", n_parts=1)
    meta = embed_catalog(items_dir, out, model=tiny_model_dir, batch_size=16, max_length=32, device="cpu")
    items = pd.read_parquet(items_dir / ITEMS_FILE)

    emb = load_embeddings(out)
    assert list(emb.item_ids) == list(items[ITEM_ID])  # same row order as items.parquet
    assert emb.vectors.shape == (300, 32) and emb.vectors.dtype == np.float32
    ref = TextEncoder(tiny_model_dir, device="cpu", max_length=32).encode(list(items[TEXT]), batch_size=64)
    np.testing.assert_allclose(emb.vectors, ref, atol=1e-5)

    # parquet schema per design: item_id string, embedding fixed_size_list<float32>[D], in part files written
    # by the workers (300 rows in a block per actor: 2 parts of 150); no single-file output
    # (the old version's part is gone)
    parts = embedding_files(out)
    assert [p.name for p in parts] == sorted(p.name for p in out.glob("part-*.parquet"))
    assert len(parts) == meta["n_parts"] == meta["n_blocks"] == 2 and not (out / EMBEDDINGS_FILE).exists()
    assert meta["parts_prefix"] != "part-0ld0ld00-"
    assert all(p.name.startswith(meta["parts_prefix"]) for p in parts)
    for part in parts:
        schema = pq.read_schema(part)
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
        "bucketing": "group",
        "layout": "parts",
        "rows_per_actor_call": 150,
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
            "2",
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
    # 300 rows fit one block (>= 8 batches of 64): a second actor would only load the model, so there is one
    assert emb.meta["n_blocks"] == 1 and emb.meta["num_actors"] == 1
    assert emb.meta["device_reason"].endswith("1 block(s) of items, so at most 1 actor(s)")
    assert emb.meta["max_length"] == 16 and emb.meta["bucketing"] == "group"
    assert list(emb.item_ids) == list(pd.read_parquet(items_dir / ITEMS_FILE)[ITEM_ID])
    items = pd.read_parquet(items_dir / ITEMS_FILE)
    ref = TextEncoder(tiny_model_dir, device="cpu", max_length=16).encode(list(items[TEXT][:50]))
    np.testing.assert_allclose(emb.vectors[:50], ref, atol=1e-5)


def _write(tmp_path: Path, df: pd.DataFrame) -> Path:
    f = tmp_path / "items.parquet"
    df.to_parquet(f, index=False)
    return f


@pytest.mark.timeout(300)
def test_catalog_errors_are_clear(ray_local, tmp_path: Path, tiny_model_dir: str) -> None:
    # schema and row counts: the driver, from the parquet footers; null / empty / duplicate ids and null
    # texts: the check tasks, before any encoder actor starts
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
    with pytest.raises(ValueError, match="EmbedConfig.batch_size must be >= 1, got 0"):
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
    # several nodes: Ray spreads the actors, so they leave a whole CPU free on some node only when they take
    # <= sum(C_i - 1); two 1-CPU nodes (tests/test_multinode.py) at 0.5 each would leave 0.5 + 0.5: deadlock
    two = plan_actors(2, 0, node_cpus=(1.0, 1.0))
    assert (two["num_actors"], two["num_cpus"]) == (2, 0.0), two
    assert plan_actors(8, 0, node_cpus=(4.0, 4.0))["num_cpus"] == 0.5  # 6 spare: 0.5 each still fits
    three = plan_actors(6, 0, node_cpus=(2.0, 2.0, 2.0))
    assert three["num_actors"] * three["num_cpus"] <= 3 + 1e-9, three
    assert plan_actors(2, 0, node_cpus=(2.0,)) == plan_actors(2, 0)
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


# ------------------------------------------------------------------ sharded layout, URIs, versions, GPU plans


def _shards(items: pd.DataFrame, folder: Path, n: int) -> Path:
    folder.mkdir(parents=True)
    for k, rows in enumerate(np.array_split(np.arange(len(items)), n)):
        items.iloc[rows][[ITEM_ID, TEXT]].to_parquet(folder / f"part-{k:02d}.parquet", index=False)
    (folder / "_SUCCESS").write_text("")  # not parquet: ignored
    return folder


@pytest.mark.timeout(300)
def test_shards_in_uri_out_replacing_the_single_file_layout(
    ray_local, items_dir: Path, tiny_model_dir: str, tmp_path: Path
) -> None:
    items = pd.read_parquet(items_dir / ITEMS_FILE)
    shards = _shards(items, tmp_path / "shards", 4)
    out = tmp_path / "emb"
    # the previous version in the single-file layout of runs made before: replaced, then deleted
    out.mkdir()
    old = np.ones((2, 32), np.float32)
    pq.write_table(
        pa.table(
            {ITEM_ID: ["x", "y"], EMBEDDING: pa.FixedSizeListArray.from_arrays(pa.array(old.ravel()), 32)}
        ),
        out / EMBEDDINGS_FILE,
    )
    write_meta(out, "embed", model_name="old", dim=32, n_items=2)
    assert list(load_embeddings(out).item_ids) == ["x", "y"]
    (out / "notes.txt").write_text("not ours")  # a foreign file is never deleted

    meta = embed_catalog(
        f"file://{shards}",
        f"file://{out}",
        model=tiny_model_dir,
        batch_size=16,
        max_length=32,
        device="cpu",
        rows_per_block=50,
    )
    ref = TextEncoder(tiny_model_dir, device="cpu", max_length=32).encode(list(items[TEXT]), batch_size=64)
    emb = load_embeddings(out)
    assert list(emb.item_ids) == list(items[ITEM_ID])  # shards in name order, rows in file order
    np.testing.assert_allclose(emb.vectors, ref, atol=1e-5)
    assert (meta["n_input_files"], meta["n_blocks"], meta["n_parts"], meta["rows_per_actor_call"]) == (
        4,
        6,
        6,
        50,
    )
    assert meta["items_file"] == f"file://{shards}" and len(meta["items_sha256"]) == 16
    assert meta["dataset_fingerprint"] == meta["items_sha256"]  # not a prepare folder
    assert not (out / EMBEDDINGS_FILE).exists() and (out / "notes.txt").exists()

    assert list(read_item_ids(out)) == list(items[ITEM_ID])
    streamed = list(iter_embeddings(out, batch_rows=40))
    assert max(len(i) for i, _ in streamed) <= 40
    np.testing.assert_array_equal(np.concatenate([v for _, v in streamed]), emb.vectors)


@pytest.mark.slow  # the failing encoder actors are restarted by Ray before the pipeline gives up: ~1-3 min
@pytest.mark.timeout(600)
def test_a_failed_run_leaves_the_previous_version(
    ray_local, items_dir: Path, tiny_model_dir: str, tmp_path: Path
) -> None:
    import shutil

    out = tmp_path / "emb"
    embed_catalog(items_dir, out, model=tiny_model_dir, batch_size=16, max_length=32, device="cpu")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    broken = tmp_path / "no-weights"  # config and tokenizer load; the encoder actors fail to start
    shutil.copytree(tiny_model_dir, broken)
    for w in list(broken.glob("*.safetensors")) + list(broken.glob("*.bin")):
        w.unlink()
    with pytest.raises(Exception, match=r"(?i)safetensors|pytorch_model|weights|no file named"):
        embed_catalog(items_dir, out, model=str(broken), batch_size=16, max_length=32, device="cpu")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # its own parts are gone, the old intact


@pytest.mark.timeout(300)
def test_bad_rows_in_shards_are_named(ray_local, tmp_path: Path, tiny_model_dir: str) -> None:
    def shards(name: str, *tables: dict) -> Path:
        d = tmp_path / name
        d.mkdir()
        for k, t in enumerate(tables):
            pd.DataFrame(t).to_parquet(d / f"s{k}.parquet", index=False)
        return d

    dup = shards(
        "dup", {ITEM_ID: ["a", "b", "c"], TEXT: ["x"] * 3}, {ITEM_ID: ["d", "a", "b"], TEXT: ["y"] * 3}
    )
    with pytest.raises(ValueError, match=r"2 duplicated 'item_id' value\(s\) \(e.g. \['a', 'b'\]\)"):
        embed_catalog(dup, tmp_path / "o", model=tiny_model_dir)
    null = shards(
        "null", {ITEM_ID: ["a", "b"], TEXT: ["x", "y"]}, {ITEM_ID: ["c", "d", "e"], TEXT: ["z", None, None]}
    )
    with pytest.raises(ValueError, match=r"null/s1.parquet: 2 null value\(s\) in 'text' \(first at row 1\)"):
        embed_catalog(null, tmp_path / "o", model=tiny_model_dir)
    empty = shards("empty", {ITEM_ID: ["a", ""], TEXT: ["x", "y"]})
    with pytest.raises(ValueError, match=r"1 empty 'item_id' value"):
        embed_catalog(empty, tmp_path / "o", model=tiny_model_dir)
    mixed = shards("mixed", {ITEM_ID: ["a"], TEXT: ["x"]}, {ITEM_ID: [1], TEXT: ["y"]})
    with pytest.raises(ValueError, match=r"mixed/s1.parquet: column 'item_id' must be string, got int64"):
        embed_catalog(mixed, tmp_path / "o", model=tiny_model_dir)
    assert not (tmp_path / "o" / META_FILE).exists()


def test_sharded_layout_reader_checks_parts(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(7, 4)).astype(np.float32)
    ids = [f"i{k}" for k in range(7)]

    def part(name: str, rows: slice) -> None:
        emb = pa.FixedSizeListArray.from_arrays(pa.array(vecs[rows].ravel()), 4)
        pq.write_table(pa.table({ITEM_ID: pa.array(ids[rows]), EMBEDDING: emb}), tmp_path / name)

    part("part-new-000001-u-0.parquet", slice(3, 7))  # name order, not write order, is row order
    part("part-new-000000-u-0.parquet", slice(0, 3))
    part("part-old-000000-u-0.parquet", slice(0, 2))  # another write's leftover: ignored
    write_meta(tmp_path, "embed", model_name="m", dim=4, n_items=7, parts_prefix="part-new-", n_parts=2)
    e = load_embeddings(tmp_path)
    assert list(e.item_ids) == ids
    np.testing.assert_array_equal(e.vectors, vecs)
    assert [p.name for p in embedding_files(tmp_path)] == [
        "part-new-000000-u-0.parquet",
        "part-new-000001-u-0.parquet",
    ]
    write_meta(tmp_path, "embed", model_name="m", dim=4, n_items=7, parts_prefix="part-new-", n_parts=3)
    with pytest.raises(ArtifactError, match=r"names 3 part file\(s\) part-new-\*.parquet, found 2"):
        load_embeddings(tmp_path)
    write_meta(tmp_path, "embed", model_name="m", dim=4, n_items=6, parts_prefix="part-new-", n_parts=2)
    with pytest.raises(ArtifactError, match=r"holds more than 3 rows .* n_items=6"):
        load_embeddings(tmp_path)
    with pytest.raises(ArtifactError, match="holds 7 item ids, its meta.json says n_items=6"):
        read_item_ids(tmp_path)
    write_meta(tmp_path, "embed", model_name="m", dim=5, n_items=7, parts_prefix="part-new-", n_parts=2)
    with pytest.raises(ArtifactError, match="vectors of dim 4, its meta.json says n_items=7 dim=5"):
        load_embeddings(tmp_path)


def test_gpu_plan_requests_what_the_cluster_has_or_can_start() -> None:
    # resources each case makes the encoder actors request, from "cluster now + autoscaler node types"
    def req(p: dict) -> tuple:
        return p["device"], p["min_actors"], p["max_actors"], p["num_gpus"], p["num_cpus"], p["fp16"]

    gpu_types = ("gpu-embed: 1 GPU x up to 4 node(s)",)
    # GPUs up now: one actor per GPU, whatever the autoscaler says
    assert req(plan_actors(16, 4)) == ("cuda", 4, 4, 1, 1.0, True)
    assert req(plan_actors(16, 4, max_gpus=8, gpu_node_types=gpu_types)) == ("cuda", 4, 4, 1, 1.0, True)
    # none up, an autoscaler GPU node type at 0 nodes: auto and cuda request GPU actors (1 .. what can come)
    for device in ("auto", "cuda"):
        p = plan_actors(8, 0, device=device, max_gpus=4, gpu_node_types=gpu_types)
        assert req(p) == ("cuda", 1, 4, 1, 1.0, True), device
        assert "autoscaler can start GPU nodes" in p["reason"] and "gpu-embed" in p["reason"]
    assert req(plan_actors(8, 0, num_actors=2, max_gpus=4, gpu_node_types=gpu_types)) == (
        "cuda",
        2,
        2,
        1,
        1.0,
        True,
    )
    unlimited = plan_actors(8, 0, max_gpus=float("inf"), gpu_node_types=("g: 8 GPU x no limit",))
    assert req(unlimited) == ("cuda", 1, 1024, 1, 1.0, True)
    # --num-gpus N: exactly N one-GPU actors, even with no GPU up and no autoscaler reporting node types
    p = plan_actors(8, 0, num_gpus=3)
    assert req(p) == ("cuda", 3, 3, 1, 1.0, True) and "wait until GPU nodes join" in p["reason"]
    p = plan_actors(8, 2, num_gpus=4, max_gpus=8, gpu_node_types=gpu_types)
    assert req(p) == ("cuda", 4, 4, 1, 1.0, True) and "autoscaler must add 2" in p["reason"]
    # auto without any GPU to have: CPU actors, and the reason says why
    p = plan_actors(2, 0)
    assert req(p) == ("cpu", 2, 2, 0, 0.5, False) and "no autoscaler reports node types" in p["reason"]
    p = plan_actors(8, 0, max_gpus=0.0)
    assert p["device"] == "cpu" and "autoscaler has no GPU node type" in p["reason"]
    assert plan_actors(16, 4, device="cpu")["reason"] == "device 'cpu' asked for"
    # requests that can never be met, or contradict each other
    with pytest.raises(ValueError, match="has no GPU .* reports no GPU node type"):
        plan_actors(8, 0, device="cuda", max_gpus=0.0)
    with pytest.raises(ValueError, match="need 4 GPUs, the cluster has 0 and can scale to 2"):
        plan_actors(8, 0, num_gpus=4, max_gpus=2.0)
    with pytest.raises(ValueError, match="asks for GPU actors but device is 'cpu'"):
        plan_actors(8, 4, device="cpu", num_gpus=2)
    with pytest.raises(ValueError, match="num_actors=2 and num_gpus=3 disagree"):
        plan_actors(8, 4, num_actors=2, num_gpus=3)


def test_autoscaler_node_types_are_read_from_the_gcs(ray_local) -> None:
    """The autoscaler's cluster config (ray-project/ray#49568), as an autoscaler reports it to the GCS."""
    import ray._raylet
    from ray.core.generated import autoscaler_pb2 as pb
    from ray.experimental import internal_kv

    from llmrec.raysetup import cluster_max_gpus, max_gpus_from_config

    cfg = pb.ClusterConfig(
        node_group_configs=[
            pb.NodeGroupConfig(name="head", resources={"CPU": 2}, max_count=1),
            pb.NodeGroupConfig(name="gpu-embed", resources={"CPU": 8, "GPU": 1}, max_count=4),
            pb.NodeGroupConfig(name="gpu-train", resources={"CPU": 32, "GPU": 8}, max_count=2),
            pb.NodeGroupConfig(name="gpu-off", resources={"GPU": 8}, max_count=0),
        ]
    )
    assert max_gpus_from_config(None) == (None, ())
    assert max_gpus_from_config(cfg) == (
        20.0,
        ("gpu-embed: 1 GPU x up to 4 node(s)", "gpu-train: 8 GPU x up to 2 node(s)"),
    )
    cfg.max_resources["GPU"] = 6
    assert max_gpus_from_config(cfg)[0] == 6.0
    cfg.node_group_configs[1].max_count = -1
    assert max_gpus_from_config(cfg)[0] == 6.0 and "no limit" in max_gpus_from_config(cfg)[1][0]

    assert cluster_max_gpus() == (None, ())  # a local Ray: no autoscaler
    ns = ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE.encode()
    key = ray._raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY.encode()
    internal_kv._internal_kv_put(key, cfg.SerializeToString(), overwrite=True, namespace=ns)
    try:
        got, types = cluster_max_gpus()
    finally:
        internal_kv._internal_kv_del(key, namespace=ns)
    assert got == 6.0 and types[0] == "gpu-embed: 1 GPU x no limit"
    assert cluster_max_gpus() == (None, ())
    assert plan_actors(2, 0, max_gpus=got, gpu_node_types=types)["device"] == "cuda"


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs 1 CUDA GPU")
@pytest.mark.timeout(600)
def test_embed_on_gpu_equals_cpu(items_dir: Path, tiny_model_dir: str, tmp_path: Path) -> None:
    """`llmrec embed --device cuda` (its own Ray, which sees the GPU): fp16 GPU actors == the CPU encoder."""
    import os
    import subprocess
    import sys

    out = tmp_path / "emb"
    cmd = [
        sys.executable,
        "-m",
        "llmrec",
        "embed",
        "--items",
        str(items_dir),
        "--out",
        str(out),
        "--model",
        tiny_model_dir,
        "--device",
        "cuda",
        "--num-gpus",
        "1",
        "--max-length",
        "32",
    ]
    r = subprocess.run(
        cmd, capture_output=True, text=True, timeout=500, env={**os.environ, "RAY_ADDRESS": ""}
    )
    assert r.returncode == 0, r.stderr[-3000:]
    emb = load_embeddings(out)
    assert (emb.meta["device"], emb.meta["num_actors"], emb.meta["fp16"]) == ("cuda", 1, True)
    items = pd.read_parquet(items_dir / ITEMS_FILE)
    assert list(emb.item_ids) == list(items[ITEM_ID])
    ref = TextEncoder(tiny_model_dir, device="cpu", max_length=32).encode(list(items[TEXT]))
    cos = (emb.vectors * ref).sum(1)  # both unit rows
    assert cos.min() > 0.999, cos.min()
