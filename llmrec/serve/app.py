"""`build_app(args) -> serve.Application`: the llmrec Serve app (import path `llmrec.serve.app:build_app`).

No side effects at import: Ray, FastAPI and the models are touched only when `build_app` is called (by
`serve run`, `serve deploy`, `llmrec serve` or a test), and the state actors only when the Ingress starts.

args (a dict; `serve run llmrec.serve.app:build_app run_dir=RUN n_shards=4` passes strings, so every value
is coerced here; the options `llmrec serve` shares take their defaults and ranges from
`llmrec.config.ServeConfig`, whose `app_args()` gives these keys):
    run_dir (required): the run folder (RUN/embeddings, RUN/index, optional RUN/scorer; RUN/events is the
        serving event log unless `log_dir` is given).
    n_shards (4): state shard actors.
    auth_token_file (None) / auth_token_env (None): the bearer token every route except /healthz requires,
        read by each replica from this file (a mounted Kubernetes Secret) or environment variable; none =
        no auth. auth_token (None): the token itself, for callers that already read it (`llmrec serve`);
        never put it in a config file.
    num_replicas (1) or autoscaling ({"min_replicas", "max_replicas", ...}): for the Ingress (and the
        Recommender when split).
    split_model (False): the model (index, scorer, text encoder) as a `Recommender` deployment of its own,
        called through its handle, instead of inside each Ingress replica (one more hop per request).
    log_user_ids (False): log user ids in clear instead of hashed.
    model (None): text encoder path/name for queries and text feedback (default: the embeddings' model).
    user_config ({}): initial Recommender/Ingress user_config (embeddings_dir, index_dir, scorer_dir,
        model_version, rank, data_dir).
    load_run_users (True): the state shards start from the users of the run's interactions (each shard loads
        its own users' last events from `data_dir`); False = start empty (user_config.data_dir, when set,
        still wins: it is the hot-swap knob).
    data_dir (RUN/data when it holds interactions.parquet, else none): the prepared data folder to load.
    state_name ("llmrec-state"), namespace ("llmrec"): names of the detached state actors.
    max_body_bytes (1 MiB), num_cpus (0.25 per replica), device ("cpu").
    history_len (200): events kept per user (the base window and live history alike).
    log_retention_days (None = keep the log): delete event-log segments a snapshot covers once they are this
        old (see `UserStateShard`'s log_retention_s for the hot-swap caveat).
    shard_memory_mb (256): Ray memory reserved per state shard actor (size it to users x bytes per user).
    state_url_env (None) / state_url (None): keep the state shards' log, snapshots and tombstones in Redis
        (`llmrec.state.backends.RedisBackend`) instead of files under log_dir: the replica reads the URL
        (with its password) from this environment variable, or takes a password-less `state_url`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llmrec.config import ServeConfig

logger = logging.getLogger(__name__)

_KNOWN_ARGS = {
    "run_dir",
    "n_shards",
    "auth_token",
    "auth_token_file",
    "auth_token_env",
    "num_replicas",
    "autoscaling",
    "log_user_ids",
    "model",
    "user_config",
    "state_name",
    "namespace",
    "max_body_bytes",
    "num_cpus",
    "device",
    "log_dir",
    "load_run_users",
    "data_dir",
    "history_len",
    "log_retention_days",
    "shard_memory_mb",
    "state_url",
    "state_url_env",
    "split_model",
}


def build_app(args: Mapping[str, Any]) -> Any:
    """Build the Serve application: the Ingress (with the model in its process, or a Recommender deployment
    behind it when `split_model`), plus the state shards the Ingress opens.

    Returns:
        a `ray.serve.Application`; run it with `serve.run(app)`.

    Raises:
        ValueError: an unknown or malformed arg, or a run folder without embeddings/index.

    Example::

        from ray import serve
        serve.run(build_app({"run_dir": "runs/movielens-latest-small"}), blocking=False)
    """
    cfg = _parse_args(args)
    from ray.serve.config import AutoscalingConfig  # noqa: F401  (fail early with a clear import error)

    from llmrec.serve.ingress import Ingress
    from llmrec.serve.recommender import Recommender
    from llmrec.serve.run_artifacts import resolve_artifacts

    # once per app, handed to the Ingress (and a split Recommender): which embeddings, index and scorer
    # serve (the registry or the run's evaluation decides the scorer), so the replicas neither repeat nor
    # disagree on that choice
    artifacts = resolve_artifacts(cfg["run_dir"], cfg["user_config"])

    scale: dict[str, Any] = (
        {"autoscaling_config": cfg["autoscaling"]}
        if cfg["autoscaling"]
        else {"num_replicas": cfg["num_replicas"]}
    )
    actor_opts = {"num_cpus": cfg["num_cpus"]}
    # `serve.run` from Python always restarts replicas on redeploy (a new random code version); surge 100 %
    # starts the new replicas before the old ones stop, so a redeploy has no gap. `serve deploy` with only a
    # changed user_config is an in-place `reconfigure` instead.
    scale["max_surge_percent"] = 100
    recommender = (  # None: every Ingress replica loads the model itself (no hop per request)
        Recommender.options(user_config=cfg["user_config"], ray_actor_options=actor_opts, **scale).bind(
            cfg["run_dir"], cfg["model"], cfg["device"], artifacts=artifacts)
        if cfg["split_model"] else None
    )
    ingress = Ingress.options(user_config=cfg["user_config"], ray_actor_options=actor_opts, **scale).bind(
        recommender,
        cfg["run_dir"],
        n_shards=cfg["n_shards"],
        model=cfg["model"],
        device=cfg["device"],
        auth_token=cfg["auth_token"],
        auth_token_file=cfg["auth_token_file"],
        auth_token_env=cfg["auth_token_env"],
        log_user_ids=cfg["log_user_ids"],
        max_body_bytes=cfg["max_body_bytes"],
        state_name=cfg["state_name"],
        namespace=cfg["namespace"],
        log_dir=cfg["log_dir"],
        data_dir=cfg["data_dir"],
        history_len=cfg["history_len"],
        log_retention_s=cfg["log_retention_s"],
        shard_memory_mb=cfg["shard_memory_mb"],
        state_url=cfg["state_url"],
        state_url_env=cfg["state_url_env"],
        artifacts=artifacts,
    )
    logger.info(
        "built llmrec app for %s (model %s, %d shards, users from %s, auth %s)",
        cfg["run_dir"],
        "in its own Recommender deployment" if cfg["split_model"] else "in the Ingress replicas",
        cfg["n_shards"],
        cfg["data_dir"] or "nowhere: the state shards start empty",
        "on" if cfg["auth_token"] or cfg["auth_token_file"] or cfg["auth_token_env"] else "off",
    )
    return ingress


def _parse_args(args: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(args, Mapping):
        raise ValueError(f"build_app args must be a dict, got {type(args).__name__}")
    unknown = sorted(set(args) - _KNOWN_ARGS)
    if unknown:
        raise ValueError(f"unknown build_app arg(s) {unknown}; valid: {sorted(_KNOWN_ARGS)}")
    if not args.get("run_dir"):
        raise ValueError("build_app needs run_dir (the folder written by `llmrec pipeline --out RUN`)")
    from llmrec.storage import is_uri

    if is_uri(str(args["run_dir"])):
        raise ValueError(
            f"run_dir {args['run_dir']!r} is a URI, but replicas read the run folder from disk on their "
            "node: use a local or shared-mount folder, or `llmrec serve --run URI --events DIR` (stages it "
            "in on one machine)"
        )
    run = Path(str(args["run_dir"])).expanduser().resolve()
    user_config = dict(args.get("user_config") or {})
    for sub, key in (("embeddings", "embeddings_dir"), ("index", "index_dir")):
        d = Path(user_config.get(key) or run / sub)
        if not (d / "meta.json").is_file():
            raise ValueError(
                f"{d} has no meta.json; run `llmrec {'embed' if sub == 'embeddings' else 'index'}` "
                f"for {run} first (or pass user_config.{key})"
            )
    autoscaling = args.get("autoscaling")
    if autoscaling is not None and not isinstance(autoscaling, Mapping):
        raise ValueError(
            f"autoscaling must be a dict like {{'min_replicas': 1, 'max_replicas': 4}}, got {autoscaling!r}"
        )
    d = ServeConfig()  # the defaults and ranges of the options `llmrec serve` shares with build_app
    opts = ServeConfig(
        shards=_int(args.get("n_shards", d.shards), "n_shards"),
        replicas=_int(args.get("num_replicas", d.replicas), "num_replicas"),
        model=str(args["model"]) if args.get("model") else None,
        log_user_ids=_bool(args.get("log_user_ids", d.log_user_ids), "log_user_ids"),
        load_run_users=_bool(args.get("load_run_users", d.load_run_users), "load_run_users"),
        history_len=_int(args.get("history_len", d.history_len), "history_len"),
        log_retention_days=_days(args.get("log_retention_days")),
        shard_memory_mb=_int(args.get("shard_memory_mb", d.shard_memory_mb), "shard_memory_mb"),
        split_model=_bool(args.get("split_model", d.split_model), "split_model"),
    )
    max_body_bytes = _int(args.get("max_body_bytes", 1 << 20), "max_body_bytes")
    if not 1024 <= max_body_bytes <= 1 << 30:
        raise ValueError(f"max_body_bytes must be an integer in [1024, {1 << 30}], got {max_body_bytes}")
    return {
        "run_dir": str(run),
        "n_shards": opts.shards,
        "auth_token": str(args["auth_token"]) if args.get("auth_token") else None,
        "auth_token_file": str(args["auth_token_file"]) if args.get("auth_token_file") else None,
        "auth_token_env": str(args["auth_token_env"]) if args.get("auth_token_env") else None,
        "num_replicas": opts.replicas,
        "autoscaling": dict(autoscaling) if autoscaling else None,
        "log_user_ids": opts.log_user_ids,
        "model": opts.model,
        "user_config": user_config,
        "state_name": str(args.get("state_name") or "llmrec-state"),
        "namespace": str(args.get("namespace") or "llmrec"),
        "max_body_bytes": max_body_bytes,
        "num_cpus": float(args.get("num_cpus", 0.25)),
        "device": str(args.get("device") or "cpu"),
        "log_dir": str(args["log_dir"]) if args.get("log_dir") else None,
        "data_dir": _data_dir(args, run, user_config, opts.load_run_users),
        "history_len": opts.history_len,
        "log_retention_s": None if opts.log_retention_days is None else opts.log_retention_days * 86400.0,
        "shard_memory_mb": opts.shard_memory_mb or None,
        "state_url": _state_url(args.get("state_url")),
        "state_url_env": str(args["state_url_env"]) if args.get("state_url_env") else None,
        "split_model": opts.split_model,
    }


def _state_url(url: Any) -> str | None:
    if not url:
        return None
    u = str(url)
    if not u.startswith(("redis://", "rediss://")):
        raise ValueError(f"state_url must be redis://host:port/db or rediss://..., got {u.split('@')[-1]!r}")
    if "@" in u.split("//", 1)[1].split("/", 1)[0]:
        raise ValueError("state_url holds a password: put the URL in an environment variable filled from a "
                         "Secret and pass its name as state_url_env")
    return u


def _days(days: Any) -> float | None:
    """log_retention_days as a number (`serve run ... log_retention_days=7` passes a string); "" = None."""
    if days is None or days == "":
        return None
    try:
        return float(days)
    except (TypeError, ValueError):
        raise ValueError(f"log_retention_days must be a number of days > 0 or null, got {days!r}") from None


def _data_dir(args: Mapping[str, Any], run: Path, user_config: Mapping[str, Any], load: bool) -> str | None:
    """The data folder whose users the state shards start from (None = start empty); see the module doc."""
    from llmrec import schema

    if "data_dir" in user_config:  # the hot-swap knob: start where reconfigure() would put the shards
        d = user_config["data_dir"]
    elif args.get("data_dir"):
        if not load:
            raise ValueError("data_dir and load_run_users=false contradict each other; pass one of them")
        d = args["data_dir"]
    else:
        default = run / schema.RUN_DATA
        found = (default / schema.INTERACTIONS_FILE).is_file()
        if load and not found:
            logger.info("%s has no %s: the state shards start empty", default, schema.INTERACTIONS_FILE)
        d = default if load and found else None
    if not d:
        return None
    p = Path(str(d)).expanduser().resolve()
    if not ((p / schema.INTERACTIONS_FILE).is_file() or (p.is_file() and p.suffix == ".parquet")):
        raise ValueError(
            f"data_dir {str(d)!r} has no {schema.INTERACTIONS_FILE}; pass a prepared data folder (RUN/data, "
            "written by `llmrec prepare`) or load_run_users=false to start with no users"
        )
    return str(p)


def _int(v: Any, name: str) -> int:
    """An int from an int or a string (`serve run ... n_shards=4`); the range is checked by ServeConfig."""
    try:
        i = int(v)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer, got {v!r}") from None
    if isinstance(v, bool) or (isinstance(v, float) and v != i):
        raise ValueError(f"{name} must be an integer, got {v!r}")
    return i


def _bool(v: Any, name: str) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("true", "1", "yes", "false", "0", "no"):
        return v.lower() in ("true", "1", "yes")
    raise ValueError(f"{name} must be true or false, got {v!r}")
