"""The batch pipeline on a two-node Ray cluster with its artifacts on S3: distributed in substance.

Two `ray start` nodes on this machine (a head and a worker that joins it), 1 CPU each, so that work has to
spread; a local S3 server (moto) holds the run. `ray job submit` runs `jobs.pipeline` twice: `--stages
prepare` (the only stage that reads the local raw-data folder), then, after that folder is deleted and with
an empty artifact cache, `--stages embed,index,train` (`--num-workers 2`): every later stage can read its
inputs only from S3. Then `jobs.recommend` ranks a users file on S3 into a parquet file on S3. The test reads
every artifact's meta.json back through llmrec.storage and asks Ray's state API on which node ids the embed
stage's Ray Data work (tokenize tasks, encoder actors), the train stage's Ray Train workers (`RayTrainWorker`
actors) and the batch rankers ran: each stage must have used both nodes. The worker node has an artifact cache
of its own, so its rankers can only have read the run by staging it from S3 themselves.

Isolation as in tests/test_local_cluster.py (whose helpers it uses): free ports, its own --temp-dir, its own
process groups, an env marker on every process it starts; teardown stops only those. Never `ray stop`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from test_local_cluster import BIN, LocalCluster, _free_ports, _marked_pids
from test_storage import _bucket, _movielens_like_source, _remote_files

from llmrec import schema, storage

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

FAKE_AWS = {  # moto accepts any credentials; the nodes' workers inherit these from the raylets
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
N_ITEMS = 120


# Two loopback addresses (Linux routes all of 127/8 to `lo`): each node looks like a host of its own.
HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"
# `ray start` refuses to join a cluster when RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (the loopback setting of
# PLATFORM.md G1), so both nodes run with 1; then Ray rewrites a node IP or an address of 127.0.0.1 /
# localhost to eth0's address, but not 127.0.0.2 / .3: every listener stays on loopback all the same.
CLUSTER_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}


class WorkerNode:
    """A second `ray start --block` node joining `head` (1 CPU), in its own process group, with the head's
    env and marker; node IP WORKER_IP. Its own --temp-dir: a node's runtime-env agent deletes the job
    packages it no longer uses under it, which in a shared one pulled the cwd from under the head's driver."""

    def __init__(self, head: LocalCluster, num_cpus: int = 1) -> None:
        self.head = head
        self.num_cpus = num_cpus
        self.cache = head.tmp / "artifact-cache-worker"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        node_mgr, obj_mgr, metrics, agent_listen, agent_grpc, rt_agent = _free_ports(6)
        cmd = [
            str(BIN / "ray"), "start", "--block", "--address", f"{HEAD_IP}:{self.head.gcs}",
            "--node-ip-address", WORKER_IP, "--num-cpus", str(self.num_cpus), "--num-gpus", "0",
            "--node-manager-port", str(node_mgr), "--object-manager-port", str(obj_mgr),
            "--metrics-export-port", str(metrics), "--dashboard-agent-listen-port", str(agent_listen),
            "--dashboard-agent-grpc-port", str(agent_grpc), "--runtime-env-agent-port", str(rt_agent),
            # two raylets on one machine: OS-chosen worker ports, never the same fixed range twice
            "--min-worker-port", "0", "--max-worker-port", "0",
            "--temp-dir", str(self.head.tmp / "ray-w"), "--disable-usage-stats",
        ]
        self.log = open(self.head.tmp / "ray-worker.log", "ab")  # noqa: SIM115 (closed in stop)
        env = {**self.head.env, storage.CACHE_ENV: str(self.cache)}  # not the head's: no disk is shared
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def stop(self) -> None:
        if self.proc is not None:
            try:  # the whole group: also a raylet left behind by a `ray start` that gave up
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
            self.log.close()


def _alive_nodes(address: str) -> list[str]:
    from ray.util.state import list_nodes

    return [n.node_id for n in list_nodes(address=address, filters=[("state", "=", "ALIVE")])]


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """A local S3 server (moto) on 127.0.0.1; fake credentials in this process's env: yields "host:port"."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as mp:
        for k, v in FAKE_AWS.items():
            mp.setenv(k, v)
        yield f"{host}:{port}"
    server.stop()


@pytest.fixture(scope="module")
def two_nodes(s3_endpoint: str) -> Iterator[tuple[LocalCluster, WorkerNode]]:
    tmp = Path(tempfile.mkdtemp(prefix="llmrec-mn-"))  # short path: Ray's unix sockets live under it
    head = LocalCluster(tmp, num_cpus=1, extra_args=("--node-ip-address", HEAD_IP,
                                                     "--min-worker-port", "0", "--max-worker-port", "0"))
    head.env.update(CLUSTER_ENV)
    head.env.update(FAKE_AWS)  # before the raylets start: their workers read and write s3:// themselves
    head.env[storage.CACHE_ENV] = str(tmp / "artifact-cache")
    worker = WorkerNode(head)
    try:
        head.start()
        worker.start()
        t0, tries = time.monotonic(), 1
        while len(_alive_nodes(head.address)) < 2:
            assert worker.proc is not None
            if worker.proc.poll() is not None and tries < 3:
                # `ray start` gives a joining raylet a fixed 30 s to register, which a loaded machine misses
                worker.stop()
                worker.start()
                tries += 1
            assert worker.proc.poll() is None, (tmp / "ray-worker.log").read_text(errors="replace")[-3000:]
            assert time.monotonic() - t0 < 300, "the worker node did not join the head within 300 s"
            time.sleep(1.0)
        yield head, worker
    finally:
        worker.stop()
        head.stop()
        leftover = _marked_pids(head.marker)
        shutil.rmtree(tmp, ignore_errors=True)
        assert not leftover, f"processes of the test cluster survived teardown: {leftover}"


def _job_id(head: LocalCluster, needle: str) -> str:
    """The Ray job id of the one submitted job whose entrypoint contains `needle`."""
    from ray.job_submission import JobSubmissionClient

    jobs = [j for j in JobSubmissionClient(head.address).list_jobs() if needle in j.entrypoint]
    assert len(jobs) == 1, [j.entrypoint for j in jobs]
    assert jobs[0].job_id, jobs[0]
    return jobs[0].job_id


def _where(address: str, job_id: str) -> list[tuple[str, str, str]]:
    """(kind, name, node_id) of every task and actor of the Ray job `job_id` (state API on the head)."""
    from ray.util.state import list_actors, list_tasks

    rows = []
    for t in list_tasks(address=address, filters=[("job_id", "=", job_id)], limit=10_000, detail=True,
                        raise_on_missing_output=False):
        rows.append(("task", f"{t.name} [{t.func_or_class_name}]", t.node_id or ""))
    for a in list_actors(address=address, filters=[("job_id", "=", job_id)], limit=10_000, detail=True,
                         raise_on_missing_output=False):
        rows.append(("actor", f"{a.class_name} [{a.name or a.repr_name or ''}]", a.node_id or ""))
    return rows


@pytest.fixture(scope="module")
def multinode_run(two_nodes: tuple[LocalCluster, WorkerNode], s3_endpoint: str,
                  tiny_model_dir: str) -> dict[str, Any]:
    head, worker = two_nodes
    src = _movielens_like_source(head.tmp / "raw", n_items=N_ITEMS, n_users=24)
    run = f"s3://{_bucket(s3_endpoint)}/runs/ml?endpoint_override={s3_endpoint}&scheme=http"
    common = ["python", "-m", "jobs.pipeline", "--dataset", "movielens-latest-small", "--source", str(src),
              "--out", run]
    t0 = time.monotonic()
    prep = head.submit([*common, "--stages", "prepare"])
    t_prep = time.monotonic() - t0
    assert prep[0] == "SUCCEEDED", prep[1][-4000:]
    # from here on nothing local can help: no raw data, and the job stages into an empty cache
    shutil.rmtree(src)
    shutil.rmtree(head.tmp / "artifact-cache", ignore_errors=True)
    shutil.rmtree(worker.cache, ignore_errors=True)
    t0 = time.monotonic()
    rest = head.submit([*common, "--stages", "embed,index,train", "--model", tiny_model_dir,
                        "--batch-size", "4", "--epochs", "1", "--num-workers", "2"], timeout_s=900)
    t_rest = time.monotonic() - t0
    print(f"[multinode] prepare job {t_prep:.1f}s, embed,index,train job {t_rest:.1f}s")
    # batch recommendations: users file and output on S3, the run read from S3 by the rankers themselves
    data = storage.stage_in(storage.join(run, schema.RUN_DATA), head.tmp / "test-cache")
    inter = pd.read_parquet(data / schema.INTERACTIONS_FILE, columns=[schema.USER_ID, schema.ITEM_ID])
    users = list(dict.fromkeys(inter[schema.USER_ID].astype(str)))[::-1]
    users_uri, recs_uri = storage.join(run, "users.txt"), storage.join(run, "recs", "top5.parquet")
    storage.write_bytes(users_uri, ("\n".join(users) + "\n").encode())
    t0 = time.monotonic()
    recs = head.submit(["python", "-m", "jobs.recommend", "--run", run, "--users", users_uri, "--k", "5",
                        "--out", recs_uri, "--users-per-shard", "2", "--num-rankers", "2"],
                       timeout_s=600)  # 12 blocks to rank, a ranker on each node (24 users: 1 by default)
    print(f"[multinode] recommend job {time.monotonic() - t0:.1f}s")
    # offline evaluation: llmrec retrained on the loo split by two Ray Train workers, data and output on S3
    t0 = time.monotonic()
    ev = head.submit(["python", "-m", "jobs.evaluate", "--data", storage.join(run, schema.RUN_DATA),
                      "--run", run, "--out", storage.join(run, "eval"), "--protocol", "loo",
                      "--models", "llmrec,popularity", "--epochs", "1", "--num-workers", "2"], timeout_s=900)
    print(f"[multinode] evaluate job {time.monotonic() - t0:.1f}s")
    nodes = _alive_nodes(head.address)
    where = _where(head.address, _job_id(head, "--stages embed,index,train"))
    where_recs = _where(head.address, _job_id(head, "jobs.recommend"))
    where_eval = _where(head.address, _job_id(head, "jobs.evaluate"))
    (head.tmp / "where.json").write_text(json.dumps({"pipeline": where, "recommend": where_recs,
                                                     "evaluate": where_eval}, indent=1))
    print(sorted({f"{k} {n} @{node[:8]}" for k, n, node in where + where_recs + where_eval}))
    return {"run": run, "rest": rest, "nodes": nodes, "where": where, "recs": recs, "where_recs": where_recs,
            "users": users, "inter": inter, "recs_uri": recs_uri, "worker_cache": worker.cache,
            "tmp": head.tmp, "eval": ev, "where_eval": where_eval}


def test_pipeline_on_two_nodes_writes_every_artifact_to_s3(multinode_run: dict[str, Any]) -> None:
    status, logs = multinode_run["rest"]
    assert status == "SUCCEEDED", logs[-4000:]
    run = multinode_run["run"]
    for part, stage in ((schema.RUN_DATA, "prepare"), (schema.RUN_EMBEDDINGS, "embed"),
                        (schema.RUN_INDEX, "index"), (schema.RUN_SCORER, "train")):
        meta = json.loads(storage.read_bytes(storage.join(run, part, schema.META_FILE)))
        assert meta["stage"] == stage, (part, meta)
    emb = json.loads(storage.read_bytes(storage.join(run, schema.RUN_EMBEDDINGS, schema.META_FILE)))
    assert emb["n_items"] == N_ITEMS
    scorer = json.loads(storage.read_bytes(storage.join(run, schema.RUN_SCORER, schema.META_FILE)))
    assert scorer["config"]["num_workers"] == 2 and scorer["n_items"] == N_ITEMS
    # Ray Train's checkpoints went to S3 beside the scorer (a worker on the other node cannot write into the
    # driver's local staging folder), not into the artifact
    ckpts = storage.join(run, schema.RUN_SCORER + "-ray", scorer["config"]["ray_run"])
    assert storage.exists(ckpts), f"no Ray Train run storage at {storage.redact(ckpts)}"
    assert not storage.exists(storage.join(run, schema.RUN_SCORER, "ray")), "checkpoints inside the artifact"


def test_embed_and_train_ran_on_both_nodes(multinode_run: dict[str, Any]) -> None:
    assert multinode_run["rest"][0] == "SUCCEEDED", multinode_run["rest"][1][-4000:]
    nodes = set(multinode_run["nodes"])
    assert len(nodes) == 2, nodes
    where = multinode_run["where"]

    def nodes_of(*needles: str) -> set[str]:
        return {node for _, name, node in where if node and any(s in name for s in needles)}

    # the embed stage's data work: Ray Data tokenize tasks and encoder actor calls (MapWorker(...).submit)
    assert nodes_of("MapBatches(_tokenize_block) ", "MapBatches(_EncodeBatch)).submit") == nodes, where
    # the train stage: the training loop of each Ray Train worker (one per node: 1 CPU each)
    assert nodes_of("RayTrainWorker.run_train_fn") == nodes, where


def test_batch_recommend_job_ranks_on_both_nodes_from_s3(multinode_run: dict[str, Any]) -> None:
    status, logs = multinode_run["recs"]
    assert status == "SUCCEEDED", logs[-4000:]
    recs = pd.read_parquet(storage.stage_in(multinode_run["recs_uri"], multinode_run["tmp"] / "test-cache"))
    users, inter = multinode_run["users"], multinode_run["inter"]
    assert list(dict.fromkeys(recs[schema.USER_ID])) == users  # the users file's order
    ranks = recs.groupby(schema.USER_ID, sort=False)["rank"].apply(list)
    assert (ranks == [[1, 2, 3, 4, 5]] * len(users)).all()
    seen = inter.groupby(schema.USER_ID)[schema.ITEM_ID].apply(set)
    assert not any(i in seen[u] for u, i in zip(recs[schema.USER_ID], recs[schema.ITEM_ID], strict=True))
    # the workers' part files went to a staging prefix on S3 that is gone: only the output is left
    assert set(_remote_files(storage.join(multinode_run["run"], "recs"))) == {"top5.parquet"}
    # the rankers (actor pool calls) ran on both nodes, and the worker node's ranker staged the scorer from
    # S3 into that node's own cache
    nodes = set(multinode_run["nodes"])
    where = multinode_run["where_recs"]
    assert {node for _, name, node in where if node and "_Ranker)).submit" in name} == nodes, where
    assert list(Path(multinode_run["worker_cache"]).rglob("model.pt")), "the worker node staged no scorer"


def test_evaluate_job_trains_llmrec_on_both_nodes_and_writes_metrics_to_s3(multinode_run: dict[str, Any]
                                                                            ) -> None:
    status, logs = multinode_run["eval"]
    assert status == "SUCCEEDED", logs[-4000:]
    run = multinode_run["run"]
    loo = json.loads(storage.read_bytes(storage.join(run, "eval", "metrics.json")))["loo"]
    assert set(loo["models"]) == {"llmrec", "llmrec_neural", "popularity"}, sorted(loo["models"])
    assert loo["tuning"]["llmrec"]["reused_run_scorer"] is False  # the run's scorer saw every event
    per_user = storage.stage_in(storage.join(run, "eval"), multinode_run["tmp"] / "eval-cache")
    llm = pd.read_parquet(per_user / "per_user.parquet").query("model == 'llmrec' and protocol == 'loo'")
    assert len(llm) == llm["user_id"].nunique() == loo["n_users"] > 0  # every test user ranked once
    # llmrec's training loop ran in one Ray Train worker per node
    nodes = set(multinode_run["nodes"])
    where = multinode_run["where_eval"]
    assert {node for _, name, node in where if node and "RayTrainWorker.run_train_fn" in name} == nodes, where
