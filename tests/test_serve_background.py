"""`make serve`'s path: `llmrec serve --train-in-background` answers /recommend at once with the text user
vector, trains the scorer in its own process meanwhile and then serves it, without a failed request between.

Everything runs as a user runs it: the CLI in subprocesses (their own local Rays), on a slice of MovieLens
(the first 3,000 ratings and the movies they touch) embedded by the tiny random BERT. Reference: the app's
own /admin/stats (which user model serves) before and after, pipeline.json (the scorer is recorded, so a later
`llmrec pipeline` reuses it) and the HTTP status of every request made while it swapped.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _slice(data_dir: Path, out: Path, n_ratings: int = 3000) -> Path:
    src = data_dir / "movielens-latest-small"
    out.mkdir(parents=True)
    lines = (src / "ratings.csv").read_text().splitlines(keepends=True)[: n_ratings + 1]
    (out / "ratings.csv").write_text("".join(lines))
    movies = {row["movieId"] for row in csv.DictReader(lines)}
    with open(src / "movies.csv", newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["movieId"] in movies]
    with open(out / "movies.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["movieId", "title", "genres"])
        w.writeheader()
        w.writerows(rows)
    (out / "tags.csv").write_text("userId,movieId,tag,timestamp\n")
    return out


@pytest.mark.timeout(1500)
def test_serve_answers_at_once_then_swaps_in_the_trained_scorer(
    data_dir: Path, tiny_model_dir: str, tmp_path: Path
) -> None:
    src = _slice(data_dir, tmp_path / "raw")
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    cli = [sys.executable, "-m", "llmrec"]
    prep = subprocess.run(
        cli + ["pipeline", "--dataset", "movielens-latest-small", "--source", str(src), "--out", str(run),
               "--stages", "prepare,embed,index", "--model", tiny_model_dir],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert prep.returncode == 0, prep.stderr[-3000:]
    port = _free_port()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(cli + ["serve", "--run", str(run), "--port", str(port), "--shards", "2",
                                   "--train-in-background"], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    statuses: list[int] = []
    try:
        t0 = time.monotonic()
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                r = requests.get(f"{base}/recommend", params={"user_id": "1", "k": 5}, timeout=30)
                if r.status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() - t0 < 600, "no answer from /recommend within 10 minutes"
            time.sleep(2)
        assert len(r.json()["items"]) == 5
        stats = requests.get(f"{base}/admin/stats", timeout=30).json()
        assert stats["model"]["scorer"] is False  # the text user vector serves first
        while True:  # keep asking while the scorer trains and the app is redeployed
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            statuses.append(requests.get(f"{base}/recommend", params={"user_id": "1", "k": 5},
                                         timeout=60).status_code)
            if requests.get(f"{base}/admin/stats", timeout=60).json()["model"]["scorer"]:
                break
            assert time.monotonic() - t0 < 1300, (tmp_path / "serve.log").read_text()[-3000:]  # ~22 min
            time.sleep(3)
        assert statuses and set(statuses) == {200}, statuses
        state = json.loads((run / "pipeline.json").read_text())
        assert {"prepare", "embed", "index", "train"} <= set(state)
        assert "background training finished" in (tmp_path / "serve.log").read_text()
        assert "[train]" in (run / "logs" / "train-background.log").read_text()
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the app and its Ray stop
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
