"""The model deployment's batches: one failing request is answered with its own error, its batch mates
normally (it used to fail every request of its @serve.batch). Runs the Recommender class without Serve: the
batch handlers are called with a whole batch through `__wrapped__` (`serve.batch` needs a replica to
queue)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np


def test_one_bad_request_does_not_fail_its_batch(tiny_model_dir: str, tmp_path: Path) -> None:
    from test_serve_app import build_tiny_run

    from llmrec.serve.recommender import Recommender, RequestFailed, unwrap_result

    build_tiny_run(tmp_path / "run", tiny_model_dir)
    rec = Recommender.func_or_class(str(tmp_path / "run"))
    dim = rec.info()["dim"]
    good = {"user_id": "u", "state": None, "k": 3, "q": None, "exclude_seen": True}
    wrong_dim = {"user_id": "v", "vector": [1.0, 2.0], "history": []}
    bad = {**good, "user_id": "v", "state": wrong_dim}

    batch = type(rec).recommend.__wrapped__
    alone = asyncio.run(batch(rec, [good]))[0]
    out = asyncio.run(batch(rec, [good, bad, good, {**good, "q": "space"}]))
    assert [len(o.get("items", [])) for o in out] == [3, 0, 3, 3]
    assert out[0] == alone and out[2] == alone  # the good requests get exactly what they get alone
    assert set(out[1]) == {"error"}
    try:
        unwrap_result(out[1], "ranking")
    except RequestFailed as e:
        assert "ranking failed" in str(e)
    else:
        raise AssertionError("an error result must raise in the caller")
    vecs = asyncio.run(type(rec).embed.__wrapped__(rec, ["space rocket"]))[0]
    assert np.isclose(np.linalg.norm(vecs), 1.0, atol=1e-4) and len(vecs) == dim
