"""llmrec.data.facets: facet_matrix against brute force, label parsing, and the canonical column through
validate_catalog -> write_items -> read_items (the parquet round trip)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmrec.data.catalog import validate_catalog
from llmrec.data.facets import facet_matrix, facet_stats, item_facets, labels_from_column, to_facet_lists
from llmrec.data.tables import read_items, write_items


def _random_facets(seed: int, n: int = 60) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    labels = [f"g{j}" for j in range(12)]
    # some items repeat a label, some have none
    return [list(rng.choice(labels, size=int(rng.integers(0, 5)), replace=True)) for _ in range(n)]


@pytest.mark.parametrize("min_items", [1, 3, 8, 1000])
def test_facet_matrix_equals_brute_force(min_items: int) -> None:
    facets = _random_facets(0)
    names, m = facet_matrix(facets, min_items=min_items)
    every = sorted({lab for f in facets for lab in f})
    want = [lab for lab in every if sum(lab in f for f in facets) >= min_items]
    assert names == want  # sorted, rare ones dropped
    dense = np.array([[lab in f for lab in want] for f in facets], dtype=bool).reshape(len(facets), len(want))
    assert m.shape == (len(facets), len(want)) and m.dtype == np.bool_ and m.format == "csr"
    assert (m.toarray() == dense).all()
    if min_items == 1:
        assert len(names) == len(every)


def test_facet_matrix_example_and_errors() -> None:
    names, m = facet_matrix([["Drama", "Comedy"], [], ["Drama", "Drama"]], min_items=2)
    assert names == ["Drama"] and m.toarray().tolist() == [[True], [False], [True]]
    names, m = facet_matrix([])
    assert names == [] and m.shape == (0, 0)
    with pytest.raises(ValueError, match="min_items must be >= 1, got 0"):
        facet_matrix([["a"]], min_items=0)


def test_labels_from_column_splits_strings_not_commas() -> None:
    vals = ["Drama|Comedy", " News ; Sports;News", "Arts, Music & Photography", None, float("nan"), "",
            ["Sci-Fi", "Arts, Crafts", "Sci-Fi", " "], np.array(["x", "y|z"], dtype=object)]
    assert labels_from_column(vals, "genre") == [
        ["Drama", "Comedy"],
        ["News", "Sports"],
        ["Arts, Music & Photography"],
        [],
        [],
        [],
        ["Sci-Fi", "Arts, Crafts"],  # lists are taken as is: no split, duplicates and blanks dropped
        ["x", "y|z"],
    ]
    with pytest.raises(ValueError, match=r"facet column 'genre', row 1: got 7 \(int\).*cast the column"):
        labels_from_column(["a", 7], "genre")
    with pytest.raises(ValueError, match=r"row 0: label 3 is int"):
        labels_from_column([["a", 3]], "genre")


def test_to_facet_lists_refuses_bare_strings() -> None:
    got = to_facet_lists([("a", "b"), np.array(["c"], dtype=object), None, []])
    assert got == [["a", "b"], ["c"], [], []]
    with pytest.raises(ValueError, match=r"row 1: got 'Drama' \(str\), expected a list of strings"):
        to_facet_lists([["x"], "Drama"])


def test_facet_stats() -> None:
    assert facet_stats([["a", "b"], [], ["b"]], "src") == {
        "n_items_with_facets": 2,
        "n_distinct": 2,
        "source": "src",
    }


def test_canonical_column_survives_the_parquet_round_trip(tmp_path: Path) -> None:
    raw = pd.DataFrame(
        {
            "item_id": ["a", "b", "c"],
            "text": ["x", "y", "z"],
            "facets": [np.array(["Drama", " Comedy", "Drama"], dtype=object), None, ("Arts, Music",)],
        }
    )
    clean, _ = validate_catalog(raw, "item_id", ["text"])
    assert clean["facets"].tolist() == [["Drama", "Comedy"], [], ["Arts, Music"]]
    write_items(clean, tmp_path)
    assert pq.read_schema(tmp_path / "items.parquet").field("facets").type == pa.list_(pa.string())
    items = read_items(tmp_path)
    assert items["facets"].tolist() == [["Drama", "Comedy"], [], ["Arts, Music"]]
    assert all(type(f) is list and all(type(x) is str for x in f) for f in items["facets"])
    assert item_facets(items) == [["Drama", "Comedy"], [], ["Arts, Music"]]
    # all-empty facets would be inferred as list<null>: write_items pins list<string>
    write_items(clean.assign(facets=[[], [], []]), tmp_path)
    assert pq.read_schema(tmp_path / "items.parquet").field("facets").type == pa.list_(pa.string())
    assert read_items(tmp_path)["facets"].tolist() == [[], [], []]


def test_bad_facets_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"items: column 'facets', row 0: got 'Drama'"):
        validate_catalog(pd.DataFrame({"id": ["a"], "t": ["x"], "facets": ["Drama"]}), "id", ["t"])
    path = tmp_path / "items.parquet"
    pd.DataFrame({"item_id": ["a"], "text": ["x"], "facets": ["Drama"]}).to_parquet(path)
    with pytest.raises(ValueError, match=r"'facets' is (large_)?string, expected list<string>.*prepare"):
        read_items(tmp_path)
    facets = pa.array([["u"], None], pa.list_(pa.string()))
    pq.write_table(pa.table({"item_id": ["a", "b"], "text": ["x", "y"], "facets": facets}), path)
    with pytest.raises(ValueError, match=r"1 null 'facets' value"):
        read_items(tmp_path)
    old = pd.DataFrame({"item_id": ["a"], "text": ["x"]})  # prepared before facets existed
    with pytest.raises(ValueError, match=r"no 'facets' column.*re-run `llmrec prepare`"):
        item_facets(old)
