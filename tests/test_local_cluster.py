"""The verified local-cluster path, as a cluster user runs it: `ray start --head`, `ray job submit` of the
jobs/ entrypoints with cluster/runtime_env.yaml, `ray job logs`, `jobs.deploy`, an HTTP round trip, and the
metric names the Grafana dashboard queries, scraped from Ray's metrics endpoint.

The cluster is this test module's own: free ports, its own --temp-dir, its own process group, and an env
marker on every process it starts. Teardown sends SIGTERM to that group (`ray start --block` stops what it
started) and then kills any process still carrying the marker. Never `ray stop`: it would stop every Ray on
the machine.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MARKER = "LLMREC_TEST_CLUSTER"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


# ----------------------------------------------------------------------------------------------- helpers
def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _marked_pids(marker: str) -> list[int]:
    """PIDs of this user's processes whose environment carries MARKER=marker."""
    needle = f"{MARKER}={marker}".encode()
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if needle in (d / "environ").read_bytes().split(b"\0"):
                    pids.append(int(d.name))
            except OSError:
                continue
    return pids


def _http_get(url: str, timeout_s: float = 5.0) -> tuple[int, str]:
    import requests

    r = requests.get(url, timeout=timeout_s)
    return r.status_code, r.text


def _runtime_env_json() -> str:
    """cluster/runtime_env.yaml without `pip` (no internet here; the node's venv has every package)."""
    env = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
    env.pop("pip", None)
    return json.dumps(env)


class LocalCluster:
    """A `ray start --head --block` of this test's own (ports, temp dir, process group, env marker).

    `num_cpus`: the head's CPUs; `extra_args`: more `ray start` flags (tests/test_multinode.py)."""

    def __init__(self, tmp: Path, num_cpus: int = 2, extra_args: tuple[str, ...] = ()) -> None:
        self.tmp = tmp
        self.num_cpus = num_cpus
        self.extra_args = extra_args
        self.marker = uuid.uuid4().hex
        (self.gcs, self.dash, self.client, self.metrics, self.agent_listen, self.agent_grpc, self.rt_agent,
         self.node_mgr, self.obj_mgr, self.http) = _free_ports(10)
        self.address = f"http://127.0.0.1:{self.dash}"
        self.env = {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0",
            "HF_HUB_OFFLINE": "1",
            MARKER: self.marker,
        }
        self.env.pop("RAY_ADDRESS", None)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 120.0) -> None:
        cmd = [
            str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", str(self.num_cpus),
            "--num-gpus", "0",
            "--port", str(self.gcs), "--include-dashboard=true", "--dashboard-host", "127.0.0.1",
            "--dashboard-port", str(self.dash), "--ray-client-server-port", str(self.client),
            "--metrics-export-port", str(self.metrics),
            "--dashboard-agent-listen-port", str(self.agent_listen),
            "--dashboard-agent-grpc-port", str(self.agent_grpc),
            "--runtime-env-agent-port", str(self.rt_agent),
            "--node-manager-port", str(self.node_mgr), "--object-manager-port", str(self.obj_mgr),
            "--temp-dir", str(self.tmp / "ray"), "--disable-usage-stats", *self.extra_args,
        ]
        self.log = open(self.tmp / "ray-start.log", "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)  # own process group, for teardown
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited {self.proc.returncode}: {self._log_tail()}")
            try:
                if _http_get(f"{self.address}/api/version")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(1.0)
        raise TimeoutError(f"dashboard not up at {self.address} after {timeout_s}s: {self._log_tail()}")

    def _log_tail(self) -> str:
        return (self.tmp / "ray-start.log").read_text(errors="replace")[-3000:]

    def ray(self, *args: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "ray"), *args], cwd=REPO, env=self.env, capture_output=True,
                              text=True, timeout=timeout_s)

    def submit(self, entrypoint: list[str], timeout_s: float = 600.0) -> tuple[str, str]:
        """`ray job submit --no-wait` from the repo root, wait for the end; -> (status, `ray job logs`)."""
        from ray.job_submission import JobSubmissionClient

        sid = f"llmrec-test-{uuid.uuid4().hex[:8]}"
        p = self.ray("job", "submit", "--address", self.address, "--submission-id", sid, "--no-wait",
                     "--runtime-env-json", _runtime_env_json(), "--", *entrypoint)
        assert p.returncode == 0, f"ray job submit failed: {p.stdout[-2000:]}{p.stderr[-2000:]}"
        client = JobSubmissionClient(self.address)
        t0 = time.monotonic()
        status = ""
        while time.monotonic() - t0 < timeout_s:
            status = str(client.get_job_status(sid).value)
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                break
            time.sleep(2.0)
        else:
            client.stop_job(sid)
        logs = self.ray("job", "logs", sid, "--address", self.address)
        assert logs.returncode == 0, logs.stderr[-2000:]
        return status, logs.stdout

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while _marked_pids(self.marker) and time.monotonic() < deadline:
            time.sleep(1.0)
        for pid in _marked_pids(self.marker):  # stragglers of THIS cluster only (env marker)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.log.close()


def _has_command(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(f"llmrec.commands.{name}") is not None


def _stages() -> list[str]:
    """The pipeline stages to run: all of them once every subcommand exists (train/evaluate came last)."""
    later = ["train", "evaluate"] if _has_command("train") and _has_command("evaluate") else []
    return ["embed", "index", *later]


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    for command in ("prepare", "embed", "index", "pipeline"):
        assert _has_command(command), f"llmrec {command} is missing"  # a deleted command must fail, not skip
    tmp = Path(tempfile.mkdtemp(prefix="llmrec-lc-"))  # short path: Ray's unix sockets live under it
    c = LocalCluster(tmp)
    try:
        c.start()
        yield c
    finally:
        c.stop()
        leftover = _marked_pids(c.marker)
        shutil.rmtree(tmp, ignore_errors=True)
        assert not leftover, f"processes of the test cluster survived teardown: {leftover}"


@pytest.fixture(scope="module")
def pipeline_run(cluster: LocalCluster, tiny_model_dir: str) -> dict[str, Any]:
    """A synthetic dataset through `jobs.prepare` then `jobs.pipeline` (embed, index, train, evaluate)."""
    from llmrec.data.synthetic import make_catalog, make_interactions

    src, run = cluster.tmp / "raw", cluster.tmp / "run"
    src.mkdir()
    items = make_catalog(120, n_topics=4, seed=0)
    items.to_csv(src / "items.csv", index=False)
    events = make_interactions(items, n_users=40, events_per_user=12, seed=0)
    # every user active over the whole period (synthetic users start at different times), so the time-cutoff
    # protocol has warm test users: spread each user's events evenly over the same 1e6 s
    pos = events.groupby("user_id").cumcount()
    n = events.groupby("user_id")["ts"].transform("size")
    user_no = events["user_id"].str[1:].astype(int)
    events["ts"] = 1_700_000_000 + pos * 1_000_000 // (n - 1).clip(lower=1) + user_no
    events.to_csv(src / "events.csv", index=False)
    t0 = time.monotonic()
    prep = cluster.submit(["python", "-m", "jobs.prepare", "--dataset", "generic", "--source", str(src),
                           "--out", str(run / "data"), "--items", "items.csv", "--interactions", "events.csv",
                           "--text-cols", "text"])
    t_prep = time.monotonic() - t0
    stages = _stages()
    t0 = time.monotonic()
    pipe = cluster.submit(["python", "-m", "jobs.pipeline", "--dataset", "generic", "--source", str(src),
                           "--out", str(run), "--stages", ",".join(stages),
                           "--model", tiny_model_dir, "--epochs", "1", "--num-workers", "1",
                           "--max-test-users", "20"])
    t_pipe = time.monotonic() - t0
    print(f"[local cluster] prepare job {t_prep:.1f}s, pipeline job {t_pipe:.1f}s")
    return {"run": run, "n_items": len(items), "prepare": prep, "pipeline": pipe, "stages": stages}


# ----------------------------------------------------------------------------------------------- tests
def test_pipeline_jobs_succeed_and_logs_show_output(pipeline_run: dict[str, Any]) -> None:
    from llmrec.artifacts import read_meta

    status, logs = pipeline_run["prepare"]
    assert status == "SUCCEEDED", logs[-4000:]
    assert '"n_items": 120' in logs, logs[-2000:]  # `llmrec prepare` prints its summary JSON
    status, logs = pipeline_run["pipeline"]
    assert status == "SUCCEEDED", logs[-4000:]
    assert "pipeline finished in" in logs, logs[-2000:]
    run = pipeline_run["run"]
    stages = pipeline_run["stages"]
    for stage in stages:
        assert f"  {stage} " in logs, f"no {stage} line in the pipeline summary"
    emb, idx = read_meta(run / "embeddings"), read_meta(run / "index")
    assert emb["n_items"] == idx["n_items"] == pipeline_run["n_items"]
    assert emb["model_name"] == idx["embed"]["model_name"]
    if "train" in stages:
        assert read_meta(run / "scorer")["stage"] == "train"
        assert (run / "eval" / "metrics.json").is_file()


def test_deploy_job_serves_feedback_then_recommend(
    cluster: LocalCluster, pipeline_run: dict[str, Any]
) -> None:
    import requests

    assert pipeline_run["pipeline"][0] == "SUCCEEDED"
    run = pipeline_run["run"]
    serve_cfg = REPO / "cluster" / "serve.yaml"
    if not serve_cfg.is_file():  # the serving engineer's file; a minimal equivalent until it lands
        serve_cfg = cluster.tmp / "serve.yaml"
        serve_cfg.write_text(yaml.safe_dump({"applications": [
            {"name": "llmrec", "route_prefix": "/", "import_path": "llmrec.serve.app:build_app",
             "args": {}}]}))
    status, logs = cluster.submit(["python", "-m", "jobs.deploy", "--serve-config", str(serve_cfg),
                                   "--run", str(run), "--set", "n_shards=2", "--set", "num_cpus=0.1",
                                   "--set", "auth_token_file=null",  # serve.yaml's local override
                                   "--http-host", "127.0.0.1", "--http-port", str(cluster.http)],
                                  timeout_s=300)
    assert status == "SUCCEEDED", logs[-4000:]
    assert "RUNNING at http://127.0.0.1" in logs and "serve deploy" in logs, logs[-2000:]
    base = f"http://127.0.0.1:{cluster.http}"
    # the app outlives the job that deployed it
    assert requests.get(f"{base}/healthz", timeout=30).status_code == 200
    user = f"lc-{uuid.uuid4().hex[:6]}"
    before = requests.get(f"{base}/recommend", params={"user_id": user, "k": 5}, timeout=60).json()
    assert before["state_version"] == 0 and len(before["items"]) == 5
    liked = before["items"][0]["item_id"]
    r = requests.post(f"{base}/feedback", json={"user_id": user, "item_id": liked, "event": "like"},
                      timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["state_version"] == 1
    after = requests.get(f"{base}/recommend", params={"user_id": user, "k": 5}, timeout=60).json()
    assert after["state_version"] == 1
    assert liked not in [it["item_id"] for it in after["items"]], "a seen item came back (exclude_seen)"
    bad = requests.post(f"{base}/feedback",
                        json={"user_id": user, "item_id": "no-such-item", "event": "like"}, timeout=60)
    assert bad.status_code == 422 and "no-such-item" in bad.json()["error"]
    # /healthz also refreshes the users gauge: the run's users (loaded by the state shards) + this one
    import pandas as pd

    inter = pd.read_parquet(run / "data" / "interactions.parquet", columns=["user_id"])
    n_run_users = inter.user_id.nunique()
    assert requests.get(f"{base}/healthz", timeout=30).json()["n_users"] == n_run_users + 1
    # the Grafana dashboard's metric names, as Ray exports them
    dash = json.loads((REPO / "cluster" / "grafana" / "llmrec-dashboard.json").read_text())
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p.get("targets", []))
    wanted = set(re.findall(r"ray_llmrec_[a-z_]+", exprs))  # the exact series names the panels query
    assert len(wanted) >= 5, wanted

    def missing(text: str) -> list[str]:
        return sorted(m for m in wanted if not re.search(rf"^{m}[{{ ]", text, re.M))

    text, t0 = "", time.monotonic()
    while time.monotonic() - t0 < 60 and (not text or missing(text)):
        time.sleep(3.0)
        requests.get(f"{base}/healthz", timeout=30)  # sets the users gauge again
        text = _http_get(f"http://127.0.0.1:{cluster.metrics}/metrics", timeout_s=10)[1]
    exported = sorted(set(re.findall(r"^(ray_llmrec_[a-z_]+)", text, re.M)))
    assert not missing(text), f"dashboard series not exported: {missing(text)}; exported: {exported}"
    # the users gauge: one series per state shard (with Serve's replica tag), summing to /healthz's n_users
    per_shard = {}
    for labels, value in re.findall(r"^ray_llmrec_state_users\{([^}]*)\} ([0-9.e+]+)$", text, re.M):
        shard = re.search(r'shard="(\d+)"', labels)
        assert shard and 'replica="' in labels, labels
        per_shard[shard.group(1)] = max(per_shard.get(shard.group(1), 0.0), float(value))
    assert sorted(per_shard) == ["0", "1"] and sum(per_shard.values()) == n_run_users + 1, per_shard
