"""validate_catalog / validate_interactions: every bad case raises with the rows, ids and the fix, and with
skip_bad_rows the same rows come back as rejects (never silently dropped)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from llmrec.data.catalog import REJECT_COLUMNS, join_text, validate_catalog, validate_interactions


def _items(**cols: list) -> pd.DataFrame:
    base = {"sku": ["a", "b", "c", "d"], "title": ["A", "B", "C", "D"], "body": ["x", "y", "z", "w"]}
    base.update(cols)
    return pd.DataFrame(base)


def test_clean_catalog_builds_text_and_keeps_fields() -> None:
    df = _items(body=["x", None, "z.", "w"])
    clean, rej = validate_catalog(df, "sku", ["title", "body"])
    assert list(clean.columns) == ["item_id", "text", "title", "body"]
    assert clean["text"].tolist() == ["A. x", "B", "C. z.", "D. w"]
    assert clean["item_id"].tolist() == ["a", "b", "c", "d"] and len(rej) == 0
    assert list(rej.columns) == list(REJECT_COLUMNS)


def test_integer_ids_become_strings() -> None:
    df = pd.DataFrame({"id": [3, 1, 2], "text": ["x", "y", "z"]})
    clean, _ = validate_catalog(df, "id", ["text"])
    assert clean["item_id"].tolist() == ["3", "1", "2"] and clean["text"].tolist() == ["x", "y", "z"]
    df = pd.DataFrame({"id": [3.0, 1.0, np.nan], "text": ["x", "y", "z"]})  # int column with a NaN
    clean, rej = validate_catalog(df, "id", ["text"], skip_bad_rows=True)
    assert clean["item_id"].tolist() == ["3", "1"] and rej["reason"].tolist() == ["missing_id"]


@pytest.mark.parametrize(
    ("df", "pattern", "reason", "rows"),
    [
        (
            _items(sku=["a", None, "c", ""]),
            r"2 row\(s\) with missing or empty sku \[missing_id\]: row 1 .*row 3",
            "missing_id",
            [1, 3],
        ),
        (
            _items(sku=["a", "b", "a", "b"]),
            r"2 row\(s\) with duplicate sku .*row 2 \(sku='a'\), row 3 \(sku='b'\)",
            "duplicate_id",
            [2, 3],
        ),
        (
            _items(title=["A", " ", "C", None], body=["x", "", "z", None]),
            r"2 row\(s\) with empty text .*row 1 \(sku='b'\), row 3 \(sku='d'\)",
            "empty_text",
            [1, 3],
        ),
        (
            _items(body=["x", 5, "z", ["w"]]),
            r"2 row\(s\) with non-string values .*row 1 .*row 3",
            "non_string_text",
            [1, 3],
        ),
        (
            _items(sku=["a", 1.5, True, "d"]),
            r"2 row\(s\) with sku that is not a string or an integer",
            "bad_id_type",
            [1, 2],
        ),
    ],
    ids=["missing_id", "duplicate_id", "empty_text", "non_string_text", "bad_id_type"],
)
def test_bad_rows_raise_then_reject(df: pd.DataFrame, pattern: str, reason: str, rows: list[int]) -> None:
    with pytest.raises(ValueError, match=pattern) as e:
        validate_catalog(df, "sku", ["title", "body"])
    assert "--skip-bad-rows" in str(e.value) and "rejects.parquet" in str(e.value)
    clean, rej = validate_catalog(df, "sku", ["title", "body"], skip_bad_rows=True)
    assert rej["row"].tolist() == rows and set(rej["reason"]) == {reason}
    assert (rej["table"] == "items").all()
    assert len(clean) + len(rej) == len(df)  # nothing silently dropped
    assert clean["item_id"].is_unique and (clean["text"] != "").all()


def test_message_caps_the_listed_rows() -> None:
    df = pd.DataFrame({"id": ["x"] * 12, "text": ["t"] * 12})
    with pytest.raises(ValueError, match=r"11 row\(s\) with duplicate id .*row 5 \(id='x'\) and 6 more"):
        validate_catalog(df, "id", ["text"])


def test_column_errors_always_raise() -> None:
    df = _items()
    with pytest.raises(
        ValueError, match=r"column\(s\) \['desc'\] not found.*\['sku', 'title', 'body'\].*--text-cols"
    ):
        validate_catalog(df, "sku", ["title", "desc"], skip_bad_rows=True)
    with pytest.raises(ValueError, match=r"column\(s\) \['id'\] not found.*--id-col"):
        validate_catalog(df, "id", ["title"])
    with pytest.raises(ValueError, match="text column 'year' has dtype int64.*cast it to string"):
        validate_catalog(_items(year=[1999, 2000, 2001, 2002]), "sku", ["title", "year"], skip_bad_rows=True)
    with pytest.raises(ValueError, match="text_cols is empty"):
        validate_catalog(df, "sku", [])
    with pytest.raises(ValueError, match="also has a column 'item_id'"):
        validate_catalog(_items(item_id=["1", "2", "3", "4"]), "sku", ["title"])
    with pytest.raises(ValueError, match="has a 'text' column but --text-cols is \\['title'\\]"):
        validate_catalog(_items(text=["1", "2", "3", "4"]), "sku", ["title"])


def test_join_text() -> None:
    assert join_text(["Title", None, float("nan"), "  ", "Body."]) == "Title. Body."
    assert join_text(["Q?", "A"]) == "Q? A" and join_text([]) == ""


# ---------------------------------------------------------------------------------------------- interactions


def _inter(**cols: list) -> pd.DataFrame:
    base = {
        "user_id": ["u1", "u1", "u2", "u3"],
        "item_id": ["a", "b", "a", "c"],
        "ts": [1, 2, 3, 4],
        "rating": [5.0, None, 3.0, None],
        "event": ["rating", "view", "rating", "click"],
    }
    base.update(cols)
    return pd.DataFrame(base)


def test_clean_interactions_dtypes() -> None:
    clean, rej = validate_interactions(_inter(user_id=[1, 1, 2, 3], ts=[1.0, 2.0, 3.0, 4.0]), ["a", "b", "c"])
    assert clean["user_id"].tolist() == ["1", "1", "2", "3"]
    assert clean["ts"].dtype == np.int64 and clean["ts"].tolist() == [1, 2, 3, 4]
    assert clean["rating"].dtype == np.float64 and clean["rating"].isna().tolist() == [
        False,
        True,
        False,
        True,
    ]
    assert len(rej) == 0


@pytest.mark.parametrize(
    ("kw", "pattern", "reason", "rows"),
    [
        (
            dict(item_id=["a", "zz", "a", "yy"]),
            r"2 row\(s\) with item_id not in the items table.*item_id='zz'",
            "unknown_item",
            [1, 3],
        ),
        (
            dict(user_id=["u1", None, "", "u3"]),
            r"2 row\(s\) with missing or empty user_id",
            "missing_user",
            [1, 2],
        ),
        (
            dict(item_id=["a", None, "a", "c"]),
            r"1 row\(s\) with missing or empty item_id",
            "missing_item",
            [1],
        ),
        (
            dict(ts=[1, None, 2.5, "soon"]),
            r"3 row\(s\) with ts that is missing or not an integer.*row 1 .*row 2 .*row 3",
            "bad_ts",
            [1, 2, 3],
        ),
        (
            dict(rating=[5.0, "great", None, None]),
            r"1 row\(s\) with rating that is not a number",
            "bad_rating",
            [1],
        ),
        (
            dict(event=["rating", "watch", "rating", None]),
            r"2 row\(s\) with event not in \['view'",
            "bad_event",
            [1, 3],
        ),
    ],
    ids=["unknown_item", "missing_user", "missing_item", "bad_ts", "bad_rating", "bad_event"],
)
def test_bad_interactions_raise_then_reject(kw: dict, pattern: str, reason: str, rows: list[int]) -> None:
    df = _inter(**kw)
    with pytest.raises(ValueError, match=pattern) as e:
        validate_interactions(df, ["a", "b", "c"])
    assert "--skip-bad-rows" in str(e.value)
    clean, rej = validate_interactions(df, ["a", "b", "c"], skip_bad_rows=True)
    assert rej["row"].tolist() == rows and set(rej["reason"]) == {reason}
    assert (rej["table"] == "interactions").all() and len(clean) + len(rej) == len(df)
    kept = [i for i in range(len(df)) if i not in rows]
    assert clean["item_id"].tolist() == [str(df["item_id"][i]) for i in kept]


def test_interaction_columns_checked() -> None:
    with pytest.raises(ValueError, match=r"missing \['event'\], unknown \['kind'\].*--event-col"):
        validate_interactions(_inter().rename(columns={"event": "kind"}))
