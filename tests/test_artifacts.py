from __future__ import annotations

import json
import os

import pytest

from llmrec.artifacts import ArtifactError, check_compatible, file_fingerprint, read_meta, write_meta
from llmrec.schema import META_FILE, SCHEMA_VERSION


def test_write_read_round_trip(tmp_path):
    written = write_meta(tmp_path / "emb", "embed", model_name="m", dim=384)
    got = read_meta(tmp_path / "emb", "embed")
    assert got == written
    assert got["schema_version"] == SCHEMA_VERSION and got["dim"] == 384 and got["stage"] == "embed"
    assert [p.name for p in (tmp_path / "emb").iterdir()] == [META_FILE]  # no temporary file left


def test_missing_meta_names_path_and_command(tmp_path):
    with pytest.raises(ArtifactError) as e:
        read_meta(tmp_path, "index")
    assert str(tmp_path / META_FILE) in str(e.value) and "llmrec index" in str(e.value)


def test_wrong_stage_refused(tmp_path):
    write_meta(tmp_path, "embed")
    with pytest.raises(ArtifactError, match="holds a 'embed' artifact, expected a 'index'"):
        read_meta(tmp_path, "index")


def test_old_schema_version_refused(tmp_path):
    meta = write_meta(tmp_path, "embed")
    meta["schema_version"] = SCHEMA_VERSION + 1
    (tmp_path / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="schema_version"):
        read_meta(tmp_path)


def test_check_compatible_names_both_values_and_fix():
    with pytest.raises(ArtifactError) as e:
        check_compatible({"model_name": "a", "dim": 32}, {"model_name": "b", "dim": 384},
                         ["model_name", "dim"], found_name="index", expected_name="embeddings",
                         rerun="llmrec index")
    msg = str(e.value)
    assert "embeddings has 'b', index has 'a'" in msg and "embeddings has 384, index has 32" in msg
    assert "re-run `llmrec index`" in msg
    # equal: no raise
    check_compatible({"dim": 3}, {"dim": 3}, ["dim"], found_name="x", expected_name="y", rerun="z")


def test_fingerprint_changes_with_content(tmp_path):
    a = tmp_path / "a"
    a.write_bytes(b"hello")
    f1 = file_fingerprint([a])
    assert f1 == file_fingerprint([a]) and len(f1) == 16
    a.write_bytes(b"hello!")
    assert file_fingerprint([a]) != f1


class _RunsCodeOnLoad:
    """A pickled object whose unpickling touches a file: what a tampered model file could do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        from pathlib import Path

        return (Path.touch, (Path(self.marker),))


def test_model_files_load_without_running_code(tmp_path) -> None:
    """Scorer.load used torch.load(weights_only=False): a model file from a bucket could run code."""
    import numpy as np
    import pandas as pd
    import pytest
    import torch

    from llmrec.artifacts import ArtifactError, load_torch_file, write_meta
    from llmrec.data.order import frame_fingerprint
    from llmrec.protocol import ItemSpace
    from llmrec.schema import INDEX_IDS_FILE, ITEM_ID, TS, USER_ID
    from llmrec.schema import SCORER_MODEL_FILE as MODEL_FILE
    from llmrec.scorer.inference import Scorer
    from llmrec.scorer.recommender import reusable_scorer

    marker = tmp_path / "pwned"
    d = tmp_path / "scorer"
    d.mkdir()
    torch.save({"model_config": {}, "model": {}, "x": _RunsCodeOnLoad(str(marker))}, d / MODEL_FILE)
    np.save(d / INDEX_IDS_FILE, np.array(["a"]))
    write_meta(d, "train")
    with pytest.raises(ArtifactError, match=r"not loaded, since unpickling them could run code. Re-train"):
        Scorer.load(d)
    assert not marker.exists()
    # evaluation's check whether a run's scorer was trained on its split reads the same file (it unpickled it
    # in full before): a tampered file whose meta.json fingerprints match is refused there too
    train = pd.DataFrame({USER_ID: ["u"], ITEM_ID: ["a"], TS: [1]})
    valid = pd.DataFrame({USER_ID: ["u"], ITEM_ID: ["a"], TS: [2]})
    write_meta(d, "train", holdout={"train_fingerprint": frame_fingerprint(train),
                                    "valid_fingerprint": frame_fingerprint(valid)})
    items = ItemSpace(np.array(["a"]), np.ones((1, 4), np.float32))
    with pytest.raises(ArtifactError, match=r"not loaded, since unpickling them could run code"):
        reusable_scorer(d, train, valid, items)
    assert not marker.exists()
    good = tmp_path / "good.pt"
    torch.save({"model_config": {"dim": 4, "names": ["a"]}, "model": {"w": torch.ones(2)}}, good)
    assert torch.equal(load_torch_file(good)["model"]["w"], torch.ones(2))


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    """A failed write leaves the old file and no temporary one; the new file gets the mode it asked for."""
    import os

    import numpy as np
    import pytest

    from llmrec.artifacts import atomic_write

    path = tmp_path / "sub" / "vectors.npy"
    atomic_write(path, lambda tmp: np.save(tmp, np.arange(3)))  # np.save appends nothing: suffix kept
    assert np.load(path).tolist() == [0, 1, 2] and os.listdir(path.parent) == ["vectors.npy"]

    def half_then_fail(tmp):
        tmp.write_bytes(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half_then_fail, durable=True)
    assert np.load(path).tolist() == [0, 1, 2] and os.listdir(path.parent) == ["vectors.npy"]
    private = tmp_path / "histories.jsonl"
    atomic_write(private, lambda tmp: tmp.write_text("x"), durable=True, mode=0o600)
    assert private.read_text() == "x" and (private.stat().st_mode & 0o777) == 0o600


def test_write_json_report_writes_what_it_returns_whole_or_not_at_all(tmp_path, monkeypatch, capsys):
    """The benchmarks' report writer: the file is json.dumps(report) and a newline, in folders it creates,
    equal to the returned text; a write that fails half-way leaves the previous report and no other file."""
    from pathlib import Path

    from llmrec.artifacts import write_json_report

    report = {"run": "runs/x", "rows": [{"n": 1, "ndcg@10": 0.25, "ci": [0.1, 0.4]}], "ok": True, "no": None}
    path = tmp_path / "bench" / "sub" / "report.json"
    text = write_json_report(report, path, indent=1)
    assert text == json.dumps(report, indent=1) + "\n" == path.read_text()
    assert json.loads(path.read_text()) == report and os.listdir(path.parent) == ["report.json"]
    assert capsys.readouterr().out == ""

    rows = [{"kind": "flat"}, {"kind": "hnsw"}]  # index.py writes a list of rows
    assert write_json_report(rows, None, echo=True) == json.dumps(rows, indent=2) + "\n"  # no --out: no file
    assert capsys.readouterr().out == json.dumps(rows, indent=2) + "\n"  # as `print(json.dumps(...))` did
    assert os.listdir(tmp_path) == ["bench"]

    def half_then_fail(self, data):
        with open(self, "wb") as f:
            f.write(data[:5])
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_bytes", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        write_json_report({"rows": []}, path, echo=True)
    assert capsys.readouterr().out == '{\n  "rows": []\n}\n'  # printed before the write failed
    assert path.read_text() == text and os.listdir(path.parent) == ["report.json"]
    monkeypatch.undo()
    with pytest.raises(TypeError, match="not JSON serializable"):
        write_json_report({"when": object()}, tmp_path / "new" / "r.json")
    assert not (tmp_path / "new").exists()
