"""docs/howto.md runs: each `# howto: <name>` python block is executed on tiny data against a reference.

- dataset: the adapter prepares a 3-product shop through `prepare` (registered as step 2 says); the written
  tables, read back by the project's readers, equal hand-written ones.
- user-encoder: RecommendCore with the example's vectorizer ranks like brute force (cosine to the newest
  positive item, seen items left out), on the example's catalog and on a seeded random one.
- route: the two blocks put into a copy of the package (schema appended to schemas.py, method at the end of
  class Ingress); the method answers 200/404/422 (fast, direct call); the app on Ray Serve answers over HTTP
  (slow).
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from llmrec.data.adapters import registry
from llmrec.data.prepare import prepare
from llmrec.data.tables import read_interactions, read_items, read_rejects

REPO = Path(__file__).resolve().parents[1]
HOWTO = REPO / "docs" / "howto.md"


def howto_blocks() -> dict[str, str]:
    """{name: code} of the ```python blocks whose first line is `# howto: <name>`."""
    blocks: dict[str, str] = {}
    for m in re.finditer(r"```python\n(# howto: (\S+)\n.*?)```", HOWTO.read_text(), flags=re.S):
        assert m.group(2) not in blocks, f"two blocks named {m.group(2)!r} in {HOWTO}"
        blocks[m.group(2)] = m.group(1)
    return blocks


def test_page_has_the_three_examples_and_is_linked() -> None:
    assert set(howto_blocks()) == {"dataset", "user-encoder", "route-schema", "route"}
    assert "docs/howto.md" in (REPO / "README.md").read_text()
    assert "howto.md" in (REPO / "docs" / "design.md").read_text()


# ---------------------------------------------------------------------------------------------- dataset
def _adapter_module() -> types.ModuleType:
    mod = types.ModuleType("llmrec.data.adapters.tiny_shop")  # as if it were the file step 1 writes
    exec(compile(howto_blocks()["dataset"], "docs/howto.md#dataset", "exec"), mod.__dict__)
    return mod


def test_dataset_example_prepares_the_tables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shop = _adapter_module()
    src = tmp_path / "raw"
    src.mkdir()
    (src / "products.csv").write_text(
        "sku,name,category\nA1,Red mug,kitchen\nB2,Blue pen,office\nC3,Green lamp,\n"
    )
    (src / "orders.csv").write_text("customer,sku,time\nu1,A1,100\nu1,B2,200\nu2,A1,150\nu2,Z9,300\n")

    with pytest.raises(ValueError, match="unknown dataset 'tiny-shop'"):  # not registered yet
        prepare(shop.NAME, src, tmp_path / "out")
    monkeypatch.setitem(registry.ADAPTERS, shop.NAME, shop)  # step 2: listed in ADAPTER_MODULES
    with pytest.raises(ValueError, match="unknown_item"):  # the Z9 order, without --skip-bad-rows
        prepare(shop.NAME, src, tmp_path / "strict")
    with pytest.raises(FileNotFoundError, match="https://example.com/tiny-shop"):
        prepare(shop.NAME, tmp_path / "missing", tmp_path / "none")

    meta = prepare(shop.NAME, src, tmp_path / "out", skip_bad_rows=True)
    items = read_items(tmp_path / "out")
    assert items["item_id"].tolist() == ["A1", "B2", "C3"]
    assert items["text"].tolist() == [
        "Red mug. Category: kitchen", "Blue pen. Category: office", "Green lamp"
    ]
    assert items["name"].tolist() == ["Red mug", "Blue pen", "Green lamp"]
    assert [list(f) for f in items["facets"]] == [["kitchen"], ["office"], []]
    inter = read_interactions(tmp_path / "out")
    expected = pd.DataFrame({"user_id": ["u1", "u1", "u2"], "item_id": ["A1", "B2", "A1"],
                             "ts": np.array([100, 200, 150], np.int64), "rating": [np.nan] * 3,
                             "event": ["purchase"] * 3})
    pd.testing.assert_frame_equal(inter[list(expected.columns)], expected, check_dtype=False)
    rejects = read_rejects(tmp_path / "out")
    assert rejects["reason"].tolist() == ["unknown_item"]
    counts = ("dataset", "n_items", "n_users", "n_interactions", "n_rejected")
    assert tuple(meta[c] for c in counts) == ("tiny-shop", 3, 2, 3, 1)
    assert meta["files"] == ["products.csv", "orders.csv"]
    assert meta["facets"]["source"] == "products.csv category"


# ----------------------------------------------------------------------------------------- user encoder
def _brute_force(
    vecs: np.ndarray, ids: list[str], liked: str, seen: set[str], k: int
) -> list[tuple[str, float]]:
    """Top-k (id, cosine) to `liked`'s vector over the unseen items, by score then catalog order."""
    scores = vecs @ vecs[ids.index(liked)]  # (N,)
    order = sorted((i for i in range(len(ids)) if ids[i] not in seen), key=lambda i: (-scores[i], i))
    return [(ids[i], float(scores[i])) for i in order[:k]]


def test_user_encoder_example_ranks_like_brute_force() -> None:
    from llmrec.index.item_index import ItemIndex
    from llmrec.serve.recommend_core import Catalog, RecommendCore
    from llmrec.serve.user_view import UserView
    from llmrec.state.user_state import Event, UserState, apply_event

    ns: dict = {}
    exec(compile(howto_blocks()["user-encoder"], "docs/howto.md#user-encoder", "exec"), ns)
    # the page's own numbers: liked a, viewed b -> c (0.8), d (0.6)
    assert [(r["item_id"], round(r["score"], 6)) for r in ns["recs"]] == [("c", 0.8), ("d", 0.6)]
    want = _brute_force(ns["vecs"], ns["ids"], "a", {"a", "b"}, 2)
    assert [r["item_id"] for r in ns["recs"]] == [i for i, _ in want]
    assert [r["score"] for r in ns["recs"]] == pytest.approx([s for _, s in want], abs=1e-6)

    # a seeded catalog: the newest positive (a 4-star rating after a later view and a dislike) decides
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(40, 8)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    ids = [f"i{j}" for j in range(40)]
    enc = ns["LastPositiveVectorizer"](ids, vecs)
    core = RecommendCore(Catalog(item_ids=ids, vectors=vecs, titles=ids), ItemIndex.build(vecs, ids),
                         vectorizer=enc)
    state = UserState("u")
    events = [("i3", "like", None), ("i7", "rating", 4.0), ("i9", "view", None), ("i11", "rating", 2.0)]
    for ts, (item, kind, value) in enumerate(events):
        state = apply_event(state, Event(user_id="u", item_id=item, event=kind, value=value, ts=float(ts)))
    assert enc(state) is not None and np.array_equal(enc(state), vecs[7])  # the shard's UserState
    assert enc(UserState("cold")) is None
    recs = core.recommend([UserView.from_state(state)], k=10)[0]  # (the ranker's UserView)
    want = _brute_force(vecs, ids, "i7", set(state.seen), 10)
    assert [r["item_id"] for r in recs] == [i for i, _ in want]
    assert [r["score"] for r in recs] == pytest.approx([s for _, s in want], abs=1e-5)


# ------------------------------------------------------------------------------------------------ route
def patched_package(root: Path) -> Path:
    """A copy of the llmrec package with the route blocks in place (docs/howto.md steps 1 and 2)."""
    blocks = howto_blocks()
    pkg = root / "llmrec"
    shutil.copytree(REPO / "llmrec", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    schemas = pkg / "serve" / "schemas.py"
    schemas.write_text(schemas.read_text() + "\n\n" + blocks["route-schema"])
    dep = pkg / "serve" / "ingress.py"
    lines = dep.read_text().splitlines(keepends=True)
    tree = ast.parse("".join(lines))
    cls = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Ingress"), None)
    assert cls is not None, f"no class Ingress in {dep}: update the route section of docs/howto.md"
    marker, body = blocks["route"].split("\n", 1)  # the marker sits at column 0, the method at 4
    method = textwrap.indent(marker + "\n" + textwrap.dedent(body), "    ")
    dep.write_text("".join(lines[: cls.end_lineno]) + "\n" + method + "".join(lines[cls.end_lineno :]))
    return root


def _run(root: Path, script: str, timeout_s: float) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(REPO / "tests")])}
    out = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True,
                         timeout=timeout_s)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


DIRECT = """
import asyncio, json, types
import llmrec, llmrec.serve.ingress as d
assert llmrec.__file__.startswith({root!r}), llmrec.__file__
spec = d.api.openapi()  # the ingress class's routes sit in an included router: read them from the spec
fn = d.Ingress.func_or_class.get_item
me = types.SimpleNamespace(_item_ids=frozenset({{"a", "b/c"}}))
got = spec["paths"].get("/items/{{item_id}}", {{}}).get("get", {{}}).get("responses", {{}})
res = {{"responses": {{k: json.dumps(v) for k, v in got.items()}}, "ok": asyncio.run(fn(me, "b/c")),
       "fields": sorted(d.S.ItemResponse.model_fields)}}
from starlette.requests import Request
scope = {{"type": "http", "method": "GET", "path": "/items/zz", "headers": []}}
res["metric_route"] = d._route_of(Request(scope))
for bad in ("zz", " "):
    try:
        asyncio.run(fn(me, bad))
    except d.ClientError as e:
        res[bad] = [e.status, str(e)]
print(json.dumps(res))
"""


def test_route_example_method_answers(tmp_path: Path) -> None:
    root = patched_package(tmp_path)
    res = _run(root, DIRECT.format(root=str(root)), 120)
    assert sorted(res["responses"]) == ["200", "404", "422"]
    assert "ItemResponse" in res["responses"]["200"] and "ErrorResponse" in res["responses"]["404"]
    assert res["ok"] == {"item_id": "b/c", "n_items": 2}
    assert res["fields"] == ["item_id", "n_items"]
    assert res["zz"][0] == 404 and "unknown item_id 'zz'" in res["zz"][1] and "(2 items)" in res["zz"][1]
    assert res[" "][0] == 422
    assert res["metric_route"] == "/items/{item_id:path}"  # error counts get the new route's tag, no list


SERVED = """
import json, sys
from pathlib import Path
import ray
from ray import serve
import llmrec
assert llmrec.__file__.startswith({root!r}), llmrec.__file__
ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False,
         object_store_memory=200 * 1024 * 1024)
from test_serve_app import App
app = App("howto", Path({run!r}), {model!r})
try:
    ok, missing = app.call("GET", "/items/space-0"), app.call("GET", "/items/nope")
    spec = app.call("GET", "/openapi.json").json()
    res = {{"ok": [ok.status_code, ok.json()], "missing": [missing.status_code, missing.json()],
            "n_ids": len(app.info["ids"]), "in_spec": "/items/{{item_id}}" in spec["paths"]}}
finally:
    app.close()
    serve.shutdown()
    ray.shutdown()
print(json.dumps(res))
"""


@pytest.mark.slow
def test_route_example_serves(tmp_path: Path, tiny_model_dir: str) -> None:
    root = patched_package(tmp_path / "pkg")
    res = _run(root, SERVED.format(root=str(root), run=str(tmp_path / "run"), model=tiny_model_dir), 600)
    assert res["ok"] == [200, {"item_id": "space-0", "n_items": res["n_ids"]}]
    assert res["missing"][0] == 404 and "unknown item_id 'nope'" in res["missing"][1]["error"]
    assert res["in_spec"]
