"""benchmarks/scale.py helpers with logic: the random embeddings artifact and the per-stage sizes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from llmrec.embed.artifact import load_embeddings

_spec = importlib.util.spec_from_file_location(
    "bench_scale", Path(__file__).resolve().parents[1] / "benchmarks" / "scale.py"
)
scale = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(scale)


def test_random_embeddings_are_a_readable_sharded_artifact(tmp_path):
    ids = [f"i{k}" for k in range(10)]
    meta = scale.write_random_embeddings(tmp_path / "emb", ids, dim=8, seed=3, part_rows=4)
    emb = load_embeddings(tmp_path / "emb")  # the project's reader checks files against meta.json
    assert meta["n_parts"] == 3 and list(emb.item_ids) == ids
    np.testing.assert_allclose(np.linalg.norm(emb.vectors, axis=1), 1.0, rtol=1e-5)
    again = scale.write_random_embeddings(tmp_path / "emb2", ids, dim=8, seed=3, part_rows=4)
    np.testing.assert_array_equal(load_embeddings(tmp_path / "emb2").vectors, emb.vectors)
    assert again["n_items"] == 10


def test_stage_sizes():
    assert scale.parse_stage_sizes([], ["embed"], None) == {"embed": [10_000, 100_000, 1_000_000]}
    assert scale.parse_stage_sizes(["train=5,6"], ["embed", "train"], [7]) == {"embed": [7], "train": [5, 6]}
    with pytest.raises(ValueError, match="STAGE=N"):
        scale.parse_stage_sizes(["nope=1"], ["embed"], None)
