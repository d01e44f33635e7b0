"""Start or join Ray the way this project needs on every machine (see docs/platform.md).

Entry points (CLI, jobs, tests) call `local_env_defaults()` once, before Ray starts, then `init_ray()`.
"""

from __future__ import annotations

import logging
import math
import os

logger = logging.getLogger(__name__)

# Ray 2.60: on a single machine keep every listener on loopback (otherwise the node IP is eth0's) and make
# the auth mode explicit (token auth is on by default and CLI clients do not send the token unless told).
LOCAL_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def local_env_defaults() -> None:
    """Set LOCAL_ENV keys the user has not set. Only entry points call this (never at import)."""
    for k, v in LOCAL_ENV.items():
        os.environ.setdefault(k, v)


def init_ray(address: str | None = None, num_cpus: int | None = None, dashboard: bool = True) -> None:
    """Join the cluster at `address` (or $RAY_ADDRESS), else start an embedded local Ray.

    The embedded Ray runs its dashboard on 127.0.0.1 (job, Ray Data and Ray Train progress; without it
    Train V2 also logs "Failed to query Ray Train Controller actor state" every second).
    A no-op when Ray is already initialised (e.g. inside `ray job submit` or a test session).
    """
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        # inside `ray job submit`: the job's runtime_env already applies, and Ray refuses a second one that
        # sets the same env vars ("conflict ... RAY_OVERRIDE_JOB_RUNTIME_ENV")
        logger.info("joining the Ray cluster of this job")
        ray.init(address=address, log_to_driver=True)
        return
    address = address or os.environ.get("RAY_ADDRESS")
    env_vars = {k: os.environ[k] for k in LOCAL_ENV if k in os.environ}
    if address:
        logger.info("joining Ray cluster at %s", address)
        ray.init(address=address, runtime_env={"env_vars": env_vars}, log_to_driver=True)
    else:
        ctx = ray.init(
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


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 1.0))


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
