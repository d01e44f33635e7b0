"""What a person sees: `llmrec embed` in a terminal-less run prints llmrec's own lines, while Ray Data's
progress dumps and INFO lines (and transformers' "Loading weights" bars from the actors) stay out of it and
land in the Ray session's log files, whose folder the command names.

Reference: the same run's output and its session's logs/ray-data/ray-data.log (Ray Data writes there with
or without us; the guarded behaviour is what reaches the terminal).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from llmrec.artifacts import write_meta
from llmrec.schema import ITEM_ID, ITEMS_FILE, TEXT

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_cli_embed_prints_one_progress_stream_and_keeps_ray_detail_in_files(
    tiny_model_dir: str, tmp_path: Path
) -> None:
    items = tmp_path / "data"
    items.mkdir()
    words = "space galaxy rocket kitchen recipe chef ghost zombie haunted star orbit oven".split()
    pd.DataFrame({ITEM_ID: [f"i{i}" for i in range(400)],
                  TEXT: [" ".join(words[(i + j) % len(words)] for j in range(1 + i % 9)) for i in range(400)]}
                 ).to_parquet(items / ITEMS_FILE, index=False)
    write_meta(items, "prepare", fingerprint="f00d", n_items=400)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    r = subprocess.run([sys.executable, "-m", "llmrec", "embed", "--items", str(items), "--out",
                        str(tmp_path / "emb"), "--model", tiny_model_dir],
                       env=env, capture_output=True, text=True, timeout=800)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "wrote 400 x 32 embeddings" in out
    for noise in ("logging_progress", "Total Progress", "Execution plan of Dataset", "Loading weights",
                  "Running Dataset"):
        assert noise not in out, f"{noise!r} reached the terminal:\n{out[-3000:]}"
    assert len(out.splitlines()) < 40, out
    m = re.search(r"Ray's detailed logs \(Ray Data progress, workers\): (\S+)", out)
    assert m, out
    ray_data_log = (Path(m.group(1)) / "ray-data" / "ray-data.log").read_text()
    assert "Execution plan of Dataset" in ray_data_log and "Total Progress" in ray_data_log
