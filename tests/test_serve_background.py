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
import re
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


CLI = [sys.executable, "-m", "llmrec"]


def _prepared_run(data_dir: Path, tiny_model_dir: str, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """(run folder after `llmrec pipeline --stages prepare,embed,index` on the slice, env for the CLI)."""
    src = _slice(data_dir, tmp_path / "raw")
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    prep = subprocess.run(
        CLI + ["pipeline", "--dataset", "movielens-latest-small", "--source", str(src), "--out", str(run),
               "--stages", "prepare,embed,index", "--model", tiny_model_dir],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert prep.returncode == 0, prep.stderr[-3000:]
    return run, env


@pytest.mark.timeout(1500)
def test_serve_answers_at_once_then_swaps_in_the_trained_scorer(
    data_dir: Path, tiny_model_dir: str, tmp_path: Path
) -> None:
    run, env = _prepared_run(data_dir, tiny_model_dir, tmp_path)
    port = _free_port()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(CLI + ["serve", "--run", str(run), "--port", str(port), "--shards", "2",
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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.timeout(900)
def test_sigterm_stops_serve_and_its_background_training(
    data_dir: Path, tiny_model_dir: str, tmp_path: Path
) -> None:
    """`kill PID` (as `docker stop` or a pod's stop sends it) to `llmrec serve --train-in-background` while
    the scorer trains: the command takes the Ctrl-C path, so the training process stops with it and serve
    exits 0. Before, Python died at the signal (exit -15) and the trainer lived on, orphaned, with its own
    Ray. Reference: the trainer's pid (from the serve log) no longer exists, and the exit code."""
    run, env = _prepared_run(data_dir, tiny_model_dir, tmp_path)
    port, log_path = _free_port(), tmp_path / "serve.log"
    with open(log_path, "w") as log:
        argv = CLI + ["serve", "--run", str(run), "--port", str(port), "--shards", "1",
                      "--train-in-background"]
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    trainer_pid = None
    try:
        t0 = time.monotonic()
        while trainer_pid is None:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            m = re.search(r"training the scorer in the background \(pid (\d+)", log_path.read_text())
            trainer_pid = int(m.group(1)) if m else None
            assert time.monotonic() - t0 < 600, "no background training within 10 minutes"
            time.sleep(1)
        r = requests.get(f"http://127.0.0.1:{port}/recommend", params={"user_id": "1", "k": 5}, timeout=30)
        assert r.status_code == 200 and len(r.json()["items"]) == 5, r.text
        assert _alive(trainer_pid) and proc.poll() is None  # the scorer is still training
        proc.send_signal(signal.SIGTERM)  # the serve process alone, as `kill PID` does
        rc = proc.wait(timeout=180)
        assert rc == 0, log_path.read_text()[-3000:]
        assert not _alive(trainer_pid), "the background training outlived serve"
        text = log_path.read_text()
        assert "SIGTERM: stopping as on Ctrl-C" in text, text[-3000:]
        assert "background training stopped" in text, text[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        if trainer_pid is not None and _alive(trainer_pid):
            os.kill(trainer_pid, signal.SIGKILL)
