"""Start or join Ray the way this project needs on every machine (docs/design.md, first section).

Entry points (CLI, jobs, tests) call `local_env_defaults()` once, before Ray starts, then `init_ray()`.
Entry points that talk to a person (the CLI, the jobs) also call `ray_detail_to_log_files()`: then
`init_ray` keeps Ray Data's progress bars and periodic progress dumps and its INFO lines off the terminal
(they stay in the Ray session's log files, whose folder it logs once), so a stage prints llmrec's own
progress lines only.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

logger = logging.getLogger(__name__)

# Ray 2.60: on a single machine keep every listener on loopback (otherwise the node IP is eth0's) and make
# the auth mode explicit (token auth is on by default and CLI clients do not send the token unless told).
LOCAL_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' "Loading weights" bar in every model-loading actor
    # Ray kills a worker process that sits idle beyond the CPU count for 1 s (its default), so after every
    # shuffle or actor pool the next stage's tasks wait for new processes to start and import pandas and
    # llmrec (~3 s each on 2 cores): training data for 900 events took 24 s, 5 s with the idle workers kept
    # a minute. Only a Ray this process starts reads it.
    "RAY_idle_worker_killing_time_threshold_ms": "60000",
    # Ray Train's controller polls its workers every 2 s (its default): a fit's start and end each wait for a
    # poll. Every 0.5 s: a tiny fit 31 -> 25 s (also in the jobs of a cluster this process joins: LOCAL_ENV
    # travels in their runtime_env; two calls per worker and second are little for a controller).
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    # Ray Data's parquet reader (2.60) starts a pool of 32 actors to read the files' footers for every
    # read_parquet, each a new worker process: on 2 cores listing one file took ~4.5 s. Footer reads are I/O
    # (each actor runs 128 of them at once), so 2 actors list thousands of files as well. Read by the driver.
    "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "2",
}
# Ray Data's logging config for the workers of an embedded local Ray: console at WARNING (see the file)
RAY_DATA_LOGGING_CONFIG = Path(__file__).with_name("ray_data_logging.yaml")
_CONSOLE = {"detail_to_files": False}


def local_env_defaults() -> None:
    """Set LOCAL_ENV keys the user has not set. Only entry points call this (never at import)."""
    for k, v in LOCAL_ENV.items():
        os.environ.setdefault(k, v)


def ray_detail_to_log_files() -> None:
    """Entry points only: from now on `init_ray` keeps Ray Data's progress and INFO lines off the terminal."""
    _CONSOLE["detail_to_files"] = True


class _DropProgressHint(logging.Filter):
    """Ray Data's one-time 'Progress bars for operators disabled. To enable, ...' hint: that is on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith("Progress bars")


def _quiet_ray_data_console(local_workers: bool) -> None:
    """This process: Ray Data's console at WARNING (its file, ray-data.log, keeps everything).

    Without a terminal Ray Data logs a progress dump of every operator every few seconds: it now lands in
    ray-data.log only. On a terminal it draws tqdm bars (not logging): one bar per dataset then, not one per
    operator. With `local_workers` (an embedded Ray, whose workers read RAY_DATA_LOGGING_CONFIG), datasets
    consumed inside workers (Ray Train's splits) log their progress to those files instead of drawing Ray's
    distributed tqdm bars in this terminal.
    """
    import sys

    import ray
    from ray.data import DataContext  # importing ray.data configures its loggers (console + ray-data.log)

    ctx = DataContext.get_current()  # travels with each Dataset, also into Ray Train's workers
    if local_workers:
        ctx.use_ray_tqdm = False
    if sys.stdout.isatty():
        ctx.enable_operator_progress_bars = False
    for handler in logging.getLogger("ray.data").handlers:
        if type(handler).__name__ != "SessionFileHandler":
            handler.setLevel(max(handler.level, logging.WARNING))
            handler.addFilter(_DropProgressHint())
    node = getattr(ray._private.worker, "_global_node", None)  # the driver's node: where the logs are
    if node is not None:
        logger.info("Ray's detailed logs (Ray Data progress, workers): %s",
                    os.path.join(node.get_session_dir_path(), "logs"))


def init_ray(address: str | None = None, num_cpus: int | None = None, dashboard: bool = True,
             connect_timeout_s: float = 5.0) -> None:
    """Join the cluster at `address` (or $RAY_ADDRESS), else start a NEW embedded local Ray.

    Without an address this never joins a cluster that `ray start` recorded on the machine (plain
    `ray.init()` would, and would retry a dead one's GCS for minutes: PLATFORM.md G10); it passes
    `address="local"`. With an address, the GCS must accept a TCP connection within `connect_timeout_s`,
    else a ValueError says so at once. The embedded Ray runs its dashboard on 127.0.0.1 (job, Ray Data and
    Ray Train progress; without it Train V2 also logs "Failed to query Ray Train Controller actor state"
    every second). A no-op when Ray is already initialised (e.g. inside `ray job submit` or a test session).

    Raises:
        ValueError: a given address does not answer, or "auto" finds no recorded cluster.
    """
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        # inside `ray job submit`: the job's runtime_env already applies, and Ray refuses a second one that
        # sets the same env vars ("conflict ... RAY_OVERRIDE_JOB_RUNTIME_ENV")
        logger.info("joining the Ray cluster of this job")
        ray.init(address=address, log_to_driver=True)
        if _CONSOLE["detail_to_files"]:
            _quiet_ray_data_console(local_workers=False)
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    env_vars = {k: os.environ[k] for k in LOCAL_ENV if k in os.environ}
    if address and address != "local":
        host_port = check_reachable(address, connect_timeout_s)
        logger.info("joining Ray cluster at %s (%s)", address, host_port)
        ray.init(address=address, runtime_env={"env_vars": env_vars}, log_to_driver=True)
    else:
        if _CONSOLE["detail_to_files"]:  # this machine's workers can read the packaged config file
            env_vars["RAY_DATA_LOGGING_CONFIG"] = str(RAY_DATA_LOGGING_CONFIG)
        ctx = ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=dashboard,
            dashboard_host="127.0.0.1",
            runtime_env={"env_vars": env_vars},
            log_to_driver=True,
        )
        res = ray.cluster_resources()
        url = getattr(ctx, "dashboard_url", None) if dashboard else None
        logger.info("started embedded local Ray (%d CPU, %d GPU)%s", res.get("CPU", 0), res.get("GPU", 0),
                    f", dashboard http://{url}" if url else "")
    if _CONSOLE["detail_to_files"]:
        _quiet_ray_data_console(local_workers=not address or address == "local")


def check_reachable(address: str, timeout_s: float = 5.0) -> str:
    """host:port of a Ray address (`host:port`, `ray://host:port`, or "auto" = the cluster `ray start`
    recorded), after checking that something accepts TCP connections there.

    Raises:
        ValueError: nothing answers (a stopped cluster, a wrong address), or "auto" finds nothing recorded.
    """
    import socket

    target = address
    if address == "auto":
        from ray._private.services import canonicalize_bootstrap_address

        target = canonicalize_bootstrap_address("auto")
        if target is None:
            raise ValueError("--address auto: no running Ray cluster is recorded on this machine; start one "
                             "(`ray start --head`) or leave --address out to start a local Ray")
    hp = target.split("://", 1)[-1].rsplit("/", 1)[0]
    host, _, port = hp.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"Ray address {address!r} is not host:port (or ray://host:port, auto)")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as e:
        raise ValueError(
            f"the Ray cluster at {address} ({host}:{port}) does not answer ({e.strerror or e}) within "
            f"{timeout_s:.0f}s; start it (`ray start --head`), fix --address / $RAY_ADDRESS, or leave both "
            "unset to start a local Ray"
        ) from None
    return f"{host}:{port}"


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 1.0))


def cluster_node_cpus() -> tuple[float, ...]:
    """CPUs of each alive node of the cluster (one entry per node)."""
    import ray

    return tuple(float(n["Resources"].get("CPU", 0.0)) for n in ray.nodes() if n.get("Alive"))


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))


def cluster_max_gpus() -> tuple[float | None, tuple[str, ...]]:
    """GPUs the cluster's autoscaler can scale to, and its GPU node types ("name: 1 GPU x up to 4 nodes").

    Read from the cluster config an autoscaler reports to the GCS (`ray._private.state.state
    .get_cluster_config()`, ray-project/ray#49568, which Ray Data's and Ray Train's autoscaling checks read):
    every node group, including those at 0 nodes. (None, ()) when no autoscaler reports a config (a plain
    `ray start` / local cluster) or the config cannot be read; then only the GPUs up now count.
    """
    import ray._private.state

    try:
        config = ray._private.state.state.get_cluster_config()
    except Exception as e:  # an older GCS without the key, or no GCS connection: treated as "no autoscaler"
        logger.debug("cannot read the autoscaler's cluster config: %s", e)
        return None, ()
    return max_gpus_from_config(config)


def max_gpus_from_config(config: object | None) -> tuple[float | None, tuple[str, ...]]:
    """`cluster_max_gpus` for a given `autoscaler_pb2.ClusterConfig` (None = no config): pure, unit-tested.

    A node group with max_count -1 has no limit (inf); `max_resources["GPU"]` caps the sum when set.
    """
    if config is None or not getattr(config, "node_group_configs", None):
        return None, ()
    total, types = 0.0, []
    for g in config.node_group_configs:
        per_node = float(g.resources.get("GPU", 0.0))
        if per_node <= 0 or g.max_count == 0:
            continue
        nodes = math.inf if g.max_count < 0 else float(g.max_count)
        total += per_node * nodes
        upto = "no limit" if g.max_count < 0 else f"up to {g.max_count} node(s)"
        types.append(f"{g.name or 'unnamed'}: {per_node:g} GPU x {upto}")
    cap = config.max_resources.get("GPU") if config.max_resources else None
    if cap is not None:
        total = min(total, float(cap))
    return total, tuple(types)
