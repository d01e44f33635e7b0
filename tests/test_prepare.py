"""`llmrec prepare` on the real datasets (counts vs the data README and vs the raw files), the generic
adapter on CSV / parquet / JSONL files, the table readers, and the command."""

from __future__ import annotations

import argparse
import gzip
import html
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from llmrec.artifacts import file_fingerprint, read_meta
from llmrec.data.prepare import DATASETS, prepare
from llmrec.data.tables import read_interactions, read_items, read_rejects
from llmrec.schema import EVENT_KINDS

CANON_INTER = {"user_id", "item_id", "ts", "rating", "event"}


def _check_canonical(out: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    items, inter, meta = read_items(out), read_interactions(out), read_meta(out, "prepare")
    assert list(items.columns[:2]) == ["item_id", "text"]
    assert items["item_id"].is_unique and (items["text"].str.strip() != "").all()
    assert set(inter.columns) == CANON_INTER
    assert inter["ts"].dtype == np.int64 and inter["rating"].dtype == np.float64
    assert inter["event"].isin(EVENT_KINDS).all()
    assert inter["item_id"].isin(set(items["item_id"])).all()
    assert meta["n_items"] == len(items) and meta["n_interactions"] == len(inter)
    assert meta["n_users"] == inter["user_id"].nunique()
    assert meta["n_rejected"] == len(read_rejects(out))
    return items, inter, meta


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, data_dir: Path):
    """Each real dataset prepared once per module: name -> out folder."""
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            out = tmp_path_factory.mktemp(name)
            prepare(name, data_dir / name, out)
            cache[name] = out
        return cache[name]

    return get


def test_datasets_tuple() -> None:
    assert DATASETS == (
        "movielens-latest-small",
        "amazon-magazine-subscriptions-2018",
        "amazon-scientific-unisrec",
        "mind-small-sample",
        "amazon-all-beauty-5core-2018",
        "amazon-musical-instruments-5core-2014",
        "generic",
    )


def test_registry_names() -> None:
    """Each --dataset name is the NAME of the adapter it runs, and every adapter module with a NAME is
    registered (a new adapter left out of ADAPTER_MODULES fails here)."""
    import importlib
    import pkgutil

    import llmrec.data.adapters as pkg
    from llmrec.data.adapters.registry import ADAPTERS, get_adapter
    from llmrec.data.adapters.registry import DATASETS as REGISTRY_DATASETS

    assert REGISTRY_DATASETS == DATASETS
    for name, module in ADAPTERS.items():
        assert module.NAME == name and get_adapter(name) is module and callable(module.load)
    named = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        m = importlib.import_module(f"{pkg.__name__}.{info.name}")
        if hasattr(m, "NAME"):
            named[m.NAME] = m
    assert named == ADAPTERS
    with pytest.raises(ValueError, match=r"unknown dataset 'nope'; choose one of \['movielens-latest-small'"):
        prepare("nope", "/nonexistent", "/nonexistent")


def test_movielens(prepared, data_dir: Path) -> None:
    out = prepared("movielens-latest-small")
    items, inter, meta = _check_canonical(out)
    assert (len(items), len(inter), inter["user_id"].nunique()) == (9742, 100836, 610)
    assert meta["n_rejected"] == 0 and not (out / "rejects.parquet").exists()
    assert {"title", "genres", "tags"} <= set(items.columns)
    toy = items.set_index("item_id").loc["1"]
    assert toy["title"] == "Toy Story (1995)"
    assert toy["genres"] == "Adventure, Animation, Children, Comedy, Fantasy"
    assert toy["text"].startswith("Toy Story (1995). Genres: Adventure, Animation, Children, Comedy, Fantasy")
    # the movie's distinct tags (case-insensitive) from tags.csv, all in the text
    tags = pd.read_csv(data_dir / "movielens-latest-small" / "tags.csv", dtype={"movieId": str})
    t1 = tags[tags.movieId == "1"]["tag"]
    assert len(toy["tags"].split(", ")) == t1.str.lower().nunique()
    assert all(t in toy["text"] for t in t1)
    raw = pd.read_csv(data_dir / "movielens-latest-small" / "ratings.csv")
    assert (inter["ts"].to_numpy() == raw["timestamp"].to_numpy()).all()
    assert inter["rating"].sum() == pytest.approx(raw["rating"].sum())
    assert (inter["event"] == "rating").all()
    src = data_dir / "movielens-latest-small"
    assert meta["fingerprint"] == file_fingerprint(
        [src / "movies.csv", src / "ratings.csv", src / "tags.csv"]
    )
    assert meta["dataset"] == "movielens-latest-small" and meta["ts_is_order"] is False
    # the tags are user-written: kept with writer and time, and the text is rebuildable from any subset
    from llmrec.data.item_text import base_texts, build_item_texts, read_text_events

    events, spec = read_text_events(out)
    assert len(events) == len(tags) == meta["text_events"]["n_events"] == 3683
    assert (events["ts"].to_numpy() == tags["timestamp"].to_numpy()).all()
    base = base_texts(items)
    assert base.loc["1"] == "Toy Story (1995). Genres: Adventure, Animation, Children, Comedy, Fantasy"
    full = build_item_texts(base, events, spec)
    assert (full.to_numpy() == items["text"].to_numpy()).all()  # every tag -> exactly the served text
    early = build_item_texts(base, events[events.ts < 1_200_000_000], spec)  # tags written before 2008
    late_only = set(tags.loc[(tags.movieId == "1") & (tags.timestamp >= 1_200_000_000), "tag"]) - set(
        tags.loc[(tags.movieId == "1") & (tags.timestamp < 1_200_000_000), "tag"]
    )
    assert late_only and not any(t in early.loc["1"] for t in late_only)
    assert (early == base).sum() > (full == base).sum()  # more movies without any tag text


def test_magazine_rejects_reconcile(prepared, data_dir: Path) -> None:
    out = prepared("amazon-magazine-subscriptions-2018")
    items, inter, meta = _check_canonical(out)
    rej = read_rejects(out)
    rej_inter = rej[rej.table == "interactions"]
    assert len(inter) + len(rej_inter) == 89689  # nothing silently dropped
    assert meta["n_rejected_interactions"] == len(rej_inter) and meta["n_rejected"] == len(rej)
    # README: 2,320 of 2,428 rated items have metadata, covering 85,219 of the 89,689 ratings
    assert (rej_inter.reason == "item_no_metadata").sum() == 89689 - 85219
    # reference: recompute "no description and no real title" from the raw metadata
    first: dict[str, dict] = {}
    with gzip.open(
        data_dir / "amazon-magazine-subscriptions-2018" / "meta_Magazine_Subscriptions.json.gz", "rt"
    ) as f:
        for line in f:
            r = json.loads(line)
            first.setdefault(r["asin"], r)
    assert len(first) == 2320
    no_text = {
        a
        for a, r in first.items()
        if not any(d.strip() for d in r.get("description") or [])
        and (not r.get("title") or "<" in r["title"])
    }
    rej_items = rej[rej.table == "items"]
    assert set(rej_items.item_id) == no_text and (rej_items.reason == "no_text").all()
    assert len(items) + len(rej_items) == 2320
    assert set(rej_inter[rej_inter.reason == "item_no_text"].item_id) <= no_text
    assert meta["rejected_reasons"] == rej.reason.value_counts().to_dict()
    assert not items["text"].str.contains("<span").any() and not items["title"].str.contains("<").any()
    assert (items["title"] != "").sum() <= 232  # only real titles survive
    assert inter["user_id"].nunique() == meta["n_users"] < 72098


def test_scientific(prepared, data_dir: Path) -> None:
    out = prepared("amazon-scientific-unisrec")
    items, inter, meta = _check_canonical(out)
    assert (len(items), len(inter), inter["user_id"].nunique()) == (4385, 59384, 8442)
    assert (
        meta["ts_is_order"] is True and inter["rating"].isna().all() and (inter["event"] == "purchase").all()
    )
    # ts is the position 0..L-1 inside each user's sequence
    pos = inter.groupby("user_id", sort=False).cumcount().to_numpy()
    assert (inter["ts"].to_numpy() == pos).all()
    # reference: user 0's last item is its test target, mapped through item2index / user2index
    src = data_dir / "amazon-scientific-unisrec"
    idx2item = {ln.split("\t")[1].strip(): ln.split("\t")[0] for ln in (src / "Scientific.item2index").open()}
    idx2user = {ln.split("\t")[1].strip(): ln.split("\t")[0] for ln in (src / "Scientific.user2index").open()}
    u, hist, target = (src / "Scientific.test.inter").open().readlines()[1].rstrip("\n").split("\t")
    seq = inter[inter.user_id == idx2user[u]]["item_id"].tolist()
    assert seq == [idx2item[i] for i in hist.split()] + [idx2item[target]]


def test_mind_reconciles_with_rejects(prepared, data_dir: Path) -> None:
    out = prepared("mind-small-sample")
    items, inter, meta = _check_canonical(out)
    src = data_dir / "mind-small-sample"
    beh = pd.read_csv(
        src / "behaviors.tsv.gz",
        sep="\t",
        header=None,
        dtype=str,
        keep_default_na=False,
        names=["imp", "user", "time", "hist", "imps"],
    )
    news = set(pd.read_csv(src / "news.tsv.gz", sep="\t", header=None, dtype=str, quoting=3, usecols=[0])[0])
    assert len(items) == 2000 and set(items.item_id) == news
    n_imp_clicks = sum(tok.endswith("-1") for s in beh.imps for tok in s.split())
    assert n_imp_clicks == 7542
    n_hist = sum(len(h.split()) for h in beh.drop_duplicates("user")["hist"])
    rej = read_rejects(out)
    assert len(inter) + len(rej) == n_hist + n_imp_clicks
    assert (rej.reason == "news_without_text").all() and not rej.item_id.isin(news).any()
    assert (inter.event == "click").all()
    # README: only 59 of the 1,916 clicked (impression) news ids have a text row
    clicked = {tok[:-2] for s in beh.imps for tok in s.split() if tok.endswith("-1")}
    assert len(clicked) == 1916 and len(clicked & news) == 59
    # history clicks are strictly earlier than the user's first impression
    t = (
        pd.to_datetime(beh.time, format="%m/%d/%Y %I:%M:%S %p", utc=True)
        - pd.Timestamp("1970-01-01", tz="UTC")
    ) // pd.Timedelta(seconds=1)
    first_ts = pd.Series(t.to_numpy(), index=beh.user).groupby(level=0).min()
    hist_rows = inter[inter.ts < inter.user_id.map(first_ts)]
    imp_rows = inter[inter.ts >= inter.user_id.map(first_ts)]
    assert len(imp_rows) == sum(
        tok.endswith("-1") and tok[:-2] in news for s in beh.imps for tok in s.split()
    )
    assert len(hist_rows) == sum(n in news for h in beh.drop_duplicates("user")["hist"] for n in h.split())
    # and they keep their order: per user, ts strictly increasing along the history
    assert (hist_rows.groupby("user_id")["ts"].diff().dropna() > 0).all()


# ------------------------------------------------------------------------------------------------- facets


def _facets_by_id(out: Path) -> dict[str, list[str]]:
    items = read_items(out)
    assert all(type(f) is list for f in items["facets"])  # the documented in-memory form
    return dict(zip(items["item_id"], items["facets"], strict=True))


def test_movielens_facets_are_the_genres(prepared, data_dir: Path) -> None:
    out = prepared("movielens-latest-small")
    got = _facets_by_id(out)
    assert got["1"] == ["Adventure", "Animation", "Children", "Comedy", "Fantasy"]
    movies = pd.read_csv(data_dir / "movielens-latest-small" / "movies.csv", dtype=str)
    want = {
        m: [] if g == "(no genres listed)" else g.split("|")
        for m, g in zip(movies.movieId, movies.genres, strict=True)
    }
    assert got == want
    assert sum(not f for f in got.values()) == (movies.genres == "(no genres listed)").sum() == 34
    # never the user tags (they would leak test users' own words): Toy Story's tags are not among its facets
    tags = pd.read_csv(data_dir / "movielens-latest-small" / "tags.csv", dtype={"movieId": str})
    assert set(tags[tags.movieId == "1"].tag) and not set(tags[tags.movieId == "1"].tag) & set(got["1"])
    distinct = {g for gs in movies.genres for g in gs.split("|")} - {"(no genres listed)"}
    assert read_meta(out, "prepare")["facets"] == {
        "n_items_with_facets": 9742 - 34,
        "n_distinct": len(distinct),
        "source": "movies.csv genres (| separated; '(no genres listed)' dropped)",
    }


def test_magazine_facets_are_the_category_list(prepared, data_dir: Path) -> None:
    out = prepared("amazon-magazine-subscriptions-2018")
    got = _facets_by_id(out)
    first: dict[str, dict] = {}
    with gzip.open(
        data_dir / "amazon-magazine-subscriptions-2018" / "meta_Magazine_Subscriptions.json.gz", "rt"
    ) as f:
        for line in f:
            r = json.loads(line)
            first.setdefault(r["asin"], r)
    # reference: the raw list, entities unescaped ("&amp;" and "&" are one category), top level dropped
    want = {}
    for a in got:
        cats = [html.unescape(c).strip() for c in first[a].get("category") or []]
        want[a] = list(dict.fromkeys(c for c in cats if c and c != "Magazine Subscriptions"))
    assert got == want
    # a category name with a comma inside stays one facet
    comma = [a for a, cats in got.items() if "Arts, Music & Photography" in cats]
    assert comma and all("Music & Photography" not in cats for cats in got.values())  # no re-split half
    assert "Arts, Music &amp; Photography" in {c for a in comma for c in first[a]["category"]}
    meta = read_meta(out, "prepare")["facets"]
    assert meta["n_items_with_facets"] == sum(bool(v) for v in want.values())
    assert meta["n_distinct"] == len({c for v in want.values() for c in v})


def test_scientific_facets_are_the_category_path(prepared, data_dir: Path) -> None:
    out = prepared("amazon-scientific-unisrec")
    got = _facets_by_id(out)
    assert got["B0000223SI"] == ["Abrasive & Finishing Products Manual Sanding Products Sanding Rolls"]
    assert got["B0000223UV"] == ["Tapes, Adhesives & Sealants Urethane Adhesives"]
    # reference: split the raw text on ". " and take the last segment under the top category
    top = "Industrial & Scientific "
    want: dict[str, list[str]] = {}
    lines = (data_dir / "amazon-scientific-unisrec" / "Scientific.text").read_text(encoding="utf-8")
    for line in lines.splitlines()[1:]:
        item, text = line.split("\t", 1)
        segs = [s.strip() for s in text.strip().rstrip(".").split(". ")]
        paths = [s[len(top):].strip() for s in segs if s.startswith(top)]
        want[item.strip()] = [paths[-1]] if paths and paths[-1] else []
    assert got == want
    # items with a scraping-artefact title "Industrial & Scientific />" get their real path
    artefact = [
        i for i, ln in zip(want, lines.splitlines()[1:], strict=True) if "Industrial & Scientific />" in ln
    ]
    assert artefact and all(got[i] and "/>" not in got[i][0] for i in artefact)
    meta = read_meta(out, "prepare")
    n_empty = sum(not v for v in want.values())
    assert meta["n_items_without_category_path"] == n_empty == 134
    assert meta["facets"]["n_items_with_facets"] == 4385 - n_empty
    assert meta["facets"]["n_distinct"] == len({v[0] for v in want.values() if v})


def test_mind_facets_are_category_and_subcategory(prepared, data_dir: Path) -> None:
    out = prepared("mind-small-sample")
    got = _facets_by_id(out)
    news = pd.read_csv(
        data_dir / "mind-small-sample" / "news.tsv.gz", sep="\t", header=None, dtype=str, quoting=3,
        usecols=[0, 1, 2], keep_default_na=False,
    )
    want = {n: list(dict.fromkeys(x for x in (c, s) if x)) for n, c, s in news.itertuples(index=False)}
    assert got == want and all(len(v) == 2 for v in got.values())
    assert read_meta(out, "prepare")["facets"]["n_distinct"] == len(set(news[1]) | set(news[2]))


def test_generic_facet_cols(tmp_path: Path) -> None:
    rows = [
        {"sku": "1", "name": "Red shoe", "genre": "Shoes|Red", "section": ["Sale", "Arts, Crafts"]},
        {"sku": "2", "name": "Blue hat", "genre": "Hats; Blue ;", "section": []},
        {"sku": "3", "name": "Scarf", "genre": None, "section": ["Sale", "Sale"]},
    ]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    kw = dict(items="c.jsonl", id_col="sku", text_cols="name")
    meta = prepare("generic", tmp_path, tmp_path / "o", facet_cols="genre,section", **kw)
    items = read_items(tmp_path / "o")
    assert items["facets"].tolist() == [["Shoes", "Red", "Sale", "Arts, Crafts"], ["Hats", "Blue"], ["Sale"]]
    assert items["genre"].tolist()[0] == "Shoes|Red"  # the source columns stay
    assert meta["facets"]["n_items_with_facets"] == 3 and meta["facets"]["n_distinct"] == 6
    assert "genre" in meta["facets"]["source"]
    # CSV: strings split on | and ;, never on commas; numeric-looking labels stay strings
    (tmp_path / "c.csv").write_text('id,t,tags\na,x,"Arts, Music|1984"\nb,y,\n')
    csv_kw = dict(items="c.csv", id_col="id", text_cols="t", facet_cols="tags")
    prepare("generic", tmp_path, tmp_path / "o2", **csv_kw)
    assert read_items(tmp_path / "o2")["facets"].tolist() == [["Arts, Music", "1984"], []]
    # no --facet-cols: every item has [] and the meta says there is no source
    meta = prepare("generic", tmp_path, tmp_path / "o3", **kw)
    assert read_items(tmp_path / "o3")["facets"].tolist() == [[], [], []]
    assert meta["facets"] == {"n_items_with_facets": 0, "n_distinct": 0, "source": None}
    # a source column named facets is the default
    pd.DataFrame({"id": ["a"], "t": ["x"], "facets": [["u", "v"]]}).to_parquet(tmp_path / "f.parquet")
    prepare("generic", tmp_path, tmp_path / "o4", items="f.parquet", id_col="id", text_cols="t")
    assert read_items(tmp_path / "o4")["facets"].tolist() == [["u", "v"]]
    with pytest.raises(ValueError, match=r"the table has a 'facets' column but --facet-cols is \['t'\]"):
        prepare("generic", tmp_path, tmp_path / "o5", items="f.parquet", id_col="id", text_cols="t",
                facet_cols="t")
    with pytest.raises(
        ValueError,
        match=r"facet column\(s\) \['genres'\] not found; the table has columns \['sku', 'name', 'genre', "
        r"'section'\]",
    ):
        prepare("generic", tmp_path, tmp_path / "o6", facet_cols="genre,genres", **kw)
    with pytest.raises(ValueError, match=r"takes no option\(s\) \['facet_cols'\]"):
        prepare("movielens-latest-small", tmp_path, tmp_path / "o7", facet_cols="x")
    # the command's --facet-cols flag reaches the adapter
    from llmrec.commands import prepare as cmd

    p = argparse.ArgumentParser()
    cmd.add_arguments(p)
    argv = ["--dataset", "generic", "--source", str(tmp_path), "--out", str(tmp_path / "o8"), "--items",
            "c.jsonl", "--id-col", "sku", "--text-cols", "name", "--facet-cols", "section"]
    assert cmd.run(p.parse_args(argv)) == 0
    assert read_items(tmp_path / "o8")["facets"].tolist() == [["Sale", "Arts, Crafts"], [], ["Sale"]]


# ------------------------------------------------------------------------------------------------ generic


def _write_generic(tmp_path: Path, fmt: str) -> tuple[str, str]:
    items = pd.DataFrame(
        {
            "sku": ["007", "008", "009"],
            "name": ["Red shoe", "Blue hat", "Green scarf"],
            "desc": ["Leather, size 9.", None, "Wool"],
            "price": [10.5, 3.0, 7.25],
        }
    )
    inter = pd.DataFrame(
        {
            "uid": ["a", "a", "b", "b"],
            "sku": ["007", "009", "008", "007"],
            "when": ["2024-01-01T00:00:00Z", "2024-01-01T00:00:10Z", "1700000000", "1700000100"],
            "stars": [5.0, None, 3.0, None],
            "kind": ["rating", "click", "rating", "view"],
        }
    )
    if fmt == "csv":
        items.to_csv(tmp_path / "items.csv", index=False)
        inter.to_csv(tmp_path / "inter.csv", index=False)
        return "items.csv", "inter.csv"
    if fmt == "parquet":
        items.to_parquet(tmp_path / "items.parquet")
        inter.to_parquet(tmp_path / "inter.parquet")
        return "items.parquet", "inter.parquet"
    items.to_json(tmp_path / "items.jsonl", orient="records", lines=True)
    inter.to_json(tmp_path / "inter.jsonl", orient="records", lines=True)
    return "items.jsonl", "inter.jsonl"


@pytest.mark.parametrize("fmt", ["csv", "parquet", "jsonl"])
def test_generic_formats(tmp_path: Path, fmt: str) -> None:
    items_f, inter_f = _write_generic(tmp_path, fmt)
    meta = prepare(
        "generic",
        tmp_path,
        tmp_path / "out",
        items=items_f,
        id_col="sku",
        text_cols="name,desc",
        interactions=inter_f,
        user_col="uid",
        item_col="sku",
        ts_col="when",
        rating_col="stars",
        event_col="kind",
    )
    items, inter, _ = _check_canonical(tmp_path / "out")
    assert items["item_id"].tolist() == ["007", "008", "009"]  # leading zeros kept
    assert items["text"].tolist() == ["Red shoe. Leather, size 9.", "Blue hat", "Green scarf. Wool"]
    assert items["price"].tolist() == [10.5, 3.0, 7.25] and "name" in items.columns
    assert inter["ts"].tolist() == [1704067200, 1704067210, 1700000000, 1700000100]
    assert inter["rating"].isna().tolist() == [False, True, False, True]
    assert inter["event"].tolist() == ["rating", "click", "rating", "view"]
    assert meta["n_users"] == 2 and meta["n_rejected"] == 0


def test_generic_defaults_and_row_order(tmp_path: Path) -> None:
    pd.DataFrame({"item_id": [1, 2], "text": ["one", "two"]}).to_parquet(tmp_path / "c.parquet")
    pd.DataFrame({"user_id": [7, 7, 8], "item_id": [2, 1, 1]}).to_csv(tmp_path / "e.csv", index=False)
    meta = prepare(
        "generic", None, tmp_path / "out", items=tmp_path / "c.parquet", interactions=tmp_path / "e.csv"
    )
    items, inter, _ = _check_canonical(tmp_path / "out")
    assert items["item_id"].tolist() == ["1", "2"]
    assert inter["ts"].tolist() == [0, 1, 2]  # no time column: row order
    assert inter["event"].tolist() == ["view"] * 3 and inter["rating"].isna().all()
    assert inter["user_id"].tolist() == ["7", "7", "8"] and meta["n_interactions"] == 3
    assert meta["ts_is_order"] is True


def test_generic_mixed_type_field_is_a_clear_error(tmp_path: Path) -> None:
    rows = [{"id": "a", "text": "x", "extra": 1}, {"id": "b", "text": "y", "extra": "two"}]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(ValueError, match=r"column\(s\) \['extra'\] cannot be stored in parquet"):
        prepare("generic", tmp_path, tmp_path / "o", items="c.jsonl", id_col="id")


def test_generic_skip_bad_rows_writes_rejects(tmp_path: Path) -> None:
    pd.DataFrame({"id": ["a", "b", "b", None, "e"], "t": ["x", "y", "y2", "z", "  "]}).to_csv(
        tmp_path / "c.csv", index=False
    )
    pd.DataFrame(
        {"user_id": ["u", "u", None, "v"], "item_id": ["a", "zzz", "a", "b"], "ts": [1, 2, 3, "later"]}
    ).to_json(tmp_path / "e.jsonl", orient="records", lines=True)
    kw = dict(items="c.csv", id_col="id", text_cols="t", interactions="e.jsonl")
    with pytest.raises(ValueError, match="skip-bad-rows"):
        prepare("generic", tmp_path, tmp_path / "out", **kw)
    meta = prepare("generic", tmp_path, tmp_path / "out", skip_bad_rows=True, **kw)
    items, inter, _ = _check_canonical(tmp_path / "out")
    rej = read_rejects(tmp_path / "out")
    assert items["item_id"].tolist() == ["a", "b"]
    assert sorted(rej[rej.table == "items"].reason) == ["duplicate_id", "empty_text", "missing_id"]
    assert sorted(rej[rej.table == "interactions"].reason) == ["bad_ts", "missing_user", "unknown_item"]
    assert len(inter) == 1 and meta["n_rejected"] == 6 == len(rej)
    assert meta["rejected_reasons"] == {
        "bad_ts": 1,
        "duplicate_id": 1,
        "empty_text": 1,
        "missing_id": 1,
        "missing_user": 1,
        "unknown_item": 1,
    }
    # a clean re-run removes the stale rejects file
    pd.DataFrame({"id": ["a"], "t": ["x"]}).to_csv(tmp_path / "ok.csv", index=False)
    prepare("generic", tmp_path, tmp_path / "out", items="ok.csv", id_col="id", text_cols="t")
    assert not (tmp_path / "out" / "rejects.parquet").exists()


def test_generic_errors(tmp_path: Path) -> None:
    pd.DataFrame({"id": ["a"], "t": ["x"]}).to_csv(tmp_path / "c.csv", index=False)
    with pytest.raises(ValueError, match=r"column\(s\) \['title'\] not found.*columns \['id', 't'\]"):
        prepare("generic", tmp_path, tmp_path / "o", items="c.csv", id_col="id", text_cols="title")
    with pytest.raises(ValueError, match="needs --items"):
        prepare("generic", tmp_path, tmp_path / "o")
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        prepare("generic", tmp_path, tmp_path / "o", items="nope.csv")
    (tmp_path / "c.xlsx").write_text("x")
    with pytest.raises(ValueError, match="unsupported file type '.xlsx'"):
        prepare("generic", tmp_path, tmp_path / "o", items="c.xlsx")
    pd.DataFrame({"who": ["u"], "item_id": ["a"]}).to_csv(tmp_path / "e.csv", index=False)
    with pytest.raises(ValueError, match="column 'user_id' .*--user-col"):
        prepare(
            "generic",
            tmp_path,
            tmp_path / "o",
            items="c.csv",
            id_col="id",
            text_cols="t",
            interactions="e.csv",
        )
    with pytest.raises(ValueError, match="unknown dataset 'movielens'.*movielens-latest-small"):
        prepare("movielens", tmp_path, tmp_path / "o")
    with pytest.raises(ValueError, match=r"takes no option\(s\) \['items'\]"):
        prepare("movielens-latest-small", tmp_path, tmp_path / "o", items="c.csv")
    with pytest.raises(FileNotFoundError, match=r"missing \['movies.csv', 'ratings.csv', 'tags.csv'\]"):
        prepare("movielens-latest-small", tmp_path, tmp_path / "o")


# ------------------------------------------------------------------------------------------------ readers


def test_readers_refuse_bad_tables(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="llmrec prepare"):
        read_items(tmp_path)
    pd.DataFrame({"item_id": ["a", "a"], "text": ["x", "y"]}).to_parquet(tmp_path / "items.parquet")
    with pytest.raises(ValueError, match="duplicate item_id.*llmrec prepare"):
        read_items(tmp_path)
    pd.DataFrame({"item_id": ["a"], "body": ["x"]}).to_parquet(tmp_path / "items.parquet")
    with pytest.raises(ValueError, match="column 'text' is missing"):
        read_items(tmp_path / "items.parquet")
    pd.DataFrame({"item_id": ["a"], "text": [" "]}).to_parquet(tmp_path / "items.parquet")
    with pytest.raises(ValueError, match="empty text"):
        read_items(tmp_path)
    inter = pd.DataFrame(
        {"user_id": ["u"], "item_id": ["a"], "ts": [1.5], "rating": [1.0], "event": ["view"]}
    )
    inter.to_parquet(tmp_path / "interactions.parquet")
    with pytest.raises(ValueError, match="column 'ts' is double, expected int64"):
        read_interactions(tmp_path)
    inter.assign(ts=[1], event=["watch"]).to_parquet(tmp_path / "interactions.parquet")
    with pytest.raises(ValueError, match=r"not in \['view'.*\['watch'\]"):
        read_interactions(tmp_path)


# ------------------------------------------------------------------------------------------------ command


def test_command_runs(tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from llmrec.commands import prepare as cmd

    p = argparse.ArgumentParser()
    cmd.add_arguments(p)
    args = p.parse_args(
        [
            "--dataset",
            "amazon-scientific-unisrec",
            "--source",
            str(data_dir / "amazon-scientific-unisrec"),
            "--out",
            str(tmp_path / "d"),
        ]
    )
    assert cmd.run(args) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["n_items"] == 4385 and printed["n_interactions"] == 59384
    assert read_meta(tmp_path / "d", "prepare")["n_users"] == 8442
    with pytest.raises(SystemExit):
        p.parse_args(["--dataset", "nope", "--out", "x"])


def test_generic_csv_numeric_looking_text_stays_text(tmp_path: Path) -> None:
    (tmp_path / "c.csv").write_text("id,title\n01,1984\n02,2001\n")
    prepare("generic", tmp_path, tmp_path / "o", items="c.csv", id_col="id", text_cols="title")
    items = read_items(tmp_path / "o")
    assert items["item_id"].tolist() == ["01", "02"] and items["text"].tolist() == ["1984", "2001"]


@pytest.mark.parametrize(
    ("name", "n_raw", "n_dup", "n_items", "n_users", "category"),
    [
        ("amazon-all-beauty-5core-2018", 5269, 1050, 85, 991, "All Beauty"),
        ("amazon-musical-instruments-5core-2014", 10261, 0, 900, 1429, "Musical Instruments"),
    ],
)
def test_amazon_5core_reviews(
    prepared, data_dir: Path, name, n_raw, n_dup, n_items, n_users, category
) -> None:
    """Reviews only: one interaction per review (exact duplicates rejected and counted), item text = a fixed
    base line + the item's reviews oldest first, the reviews kept as text events (README counts)."""
    from llmrec.data.item_text import base_texts, build_item_texts, read_text_events

    out = prepared(name)
    items, inter, meta = _check_canonical(out)
    raw = pd.read_json(next((data_dir / name).glob("*.json.gz")), lines=True, dtype={"asin": str})
    rej = read_rejects(out) if n_dup else pd.DataFrame({"reason": []})
    assert len(inter) + len(rej) == n_raw and (rej["reason"] == "duplicate_review").sum() == n_dup
    assert (len(items), inter["user_id"].nunique()) == (n_items, n_users)
    assert (inter["event"] == "rating").all() and set(inter["rating"].unique()) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    assert (base_texts(items) == f"{category} product.").all()
    events, spec = read_text_events(out)
    assert (build_item_texts(base_texts(items), events, spec).to_numpy() == items["text"].to_numpy()).all()
    # reference: an item's text starts with its oldest review's summary
    a = items["item_id"].iloc[0]
    oldest = raw[raw.asin == a].sort_values("unixReviewTime", kind="stable").iloc[0]
    assert items["text"].iloc[0].startswith(f"{category} product. Reviews: {str(oldest['summary']).strip()}")
    assert meta["text_events"]["n_events"] == len(events) and meta["facets"]["n_items_with_facets"] == 0
