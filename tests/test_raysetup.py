"""init_ray: a new local Ray unless an address is given; a given address that does not answer fails fast."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmrec.raysetup import check_reachable


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when the with block ends


def test_a_given_address_that_does_not_answer_fails_fast_with_a_message() -> None:
    port = _closed_port()
    t0 = time.monotonic()
    want = rf"127.0.0.1:{port} \(127.0.0.1:{port}\) does not answer .*ray start"
    with pytest.raises(ValueError, match=want):
        check_reachable(f"127.0.0.1:{port}", timeout_s=2)
    with pytest.raises(ValueError, match="does not answer"):
        check_reachable(f"ray://127.0.0.1:{port}", timeout_s=2)
    assert time.monotonic() - t0 < 10
    with pytest.raises(ValueError, match="is not host:port"):
        check_reachable("nonsense", timeout_s=1)


def test_no_address_starts_a_local_ray_even_with_a_stale_recorded_cluster() -> None:
    """`ray.init()` would join the cluster `ray start` recorded; when it is gone it retried its GCS for
    minutes.
    A private RAY_TMPDIR holds a stale record (a dead GCS port), so nothing on the machine is touched."""
    import shutil
    import tempfile

    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    (ray_tmp / "ray").mkdir(parents=True)
    (ray_tmp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{_closed_port()}")
    code = (
        "import time, ray\n"
        "from llmrec.raysetup import init_ray\n"
        "t0 = time.monotonic()\n"
        "init_ray(num_cpus=1, dashboard=False)\n"
        "print('started', round(time.monotonic() - t0, 1), ray.cluster_resources().get('CPU'), flush=True)\n"
        "ray.shutdown()\n"
    )
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                             env=env)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "started" in out.stdout and out.stdout.split()[2] == "1.0"


_IDLE_WORKERS_SCRIPT = """
import os, time
import numpy as np
import ray, ray.data
from llmrec.raysetup import init_ray, local_env_defaults
local_env_defaults()
init_ray(num_cpus=2, dashboard=False)
ray.data.DataContext.get_current().enable_progress_bars = False

def pids(ds):
    out = ds.map_batches(lambda b: {"pid": np.full(len(b["id"]), os.getpid())}, batch_size=None).to_pandas()
    return set(out["pid"].tolist())

ds = ray.data.range(100, override_num_blocks=4).materialize()
before = pids(ds)
shuffled = ds.repartition(4, keys=["id"]).materialize()  # the hash shuffle's actors take worker slots
time.sleep(3)  # longer than Ray's default idle-worker lifetime (1 s)
after = pids(shuffled)
print("REUSED", len(after & before), "NEW", len(after - before), flush=True)
import tempfile, pandas as pd, ray._private.state as rstate
path = os.path.join(tempfile.mkdtemp(), "x.parquet")
pd.DataFrame({"id": range(10)}).to_parquet(path)
assert len(ray.data.read_parquet(path).to_pandas()) == 10
footer = [a for a in rstate.actors().values() if a.get("ActorClassName") == "FooterReader"]
print("FOOTER_ACTORS", len(footer), flush=True)
ray.shutdown()
"""


@pytest.mark.slow  # a performance guard (a fresh Ray in a subprocess, ~28 s); `make test-slow` runs it
def test_an_embedded_ray_keeps_its_idle_workers_across_a_shuffle() -> None:
    """With Ray's default (idle workers beyond the CPU count die after 1 s) the stage after a shuffle starts
    new worker processes, each importing pandas and llmrec again (~3 s per stage on 2 cores: a tiny fit took
    49 s instead of 31). An embedded Ray started through local_env_defaults + init_ray reuses them. And a
    read_parquet lists its file with 2 footer-reading actors, not Ray's 32 new processes."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # as local_env_defaults sets them
    out = subprocess.run([sys.executable, "-c", _IDLE_WORKERS_SCRIPT], capture_output=True, text=True,
                         timeout=180, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("REUSED"))
    reused, new = int(line.split()[1]), int(line.split()[3])
    assert reused >= 1 and new == 0, line
    footer = next(x for x in out.stdout.splitlines() if x.startswith("FOOTER_ACTORS"))
    assert int(footer.split()[1]) == 2, footer
