"""Static checks of everything a cluster user runs from cluster/: it parses, it pins the same Ray as
pyproject.toml, it asks for GPUs where GPU work runs, and every entrypoint / import path it names exists.

No cluster is started here (tests/test_local_cluster.py does that); each check compares a config against
the repository itself (pyproject's pins, the jobs/ modules, the CLI parsers, Ray's own launcher schema).
"""

from __future__ import annotations

import importlib
import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
METRICS = (
    "ray_llmrec_feedback_events_total",
    "ray_llmrec_feedback_latency_ms_bucket",
    "ray_llmrec_recommend_latency_ms_bucket",
    "ray_llmrec_state_users",
    "ray_llmrec_errors_total",
)
JOB_RE = re.compile(r"python3? -m (jobs\.[A-Za-z_][A-Za-z0-9_]*)")


# ----------------------------------------------------------------------------------------------- helpers
def _pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _reqs(specs: list[str]) -> dict[str, Requirement]:
    return {Requirement(s).name.lower(): Requirement(s) for s in specs}


def _ray_version() -> str:
    ray_req = _reqs(_pyproject()["project"]["dependencies"])["ray"]
    pins = [s.version for s in ray_req.specifier if s.operator == "=="]
    assert len(pins) == 1, f"pyproject must pin ray with ==, got {ray_req}"
    return pins[0]


def _load(path: Path) -> list[Any]:
    if path.suffix == ".json":
        return [json.loads(path.read_text())]
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _config_files() -> list[Path]:
    return sorted(p for p in CLUSTER.rglob("*") if p.suffix in (".yaml", ".yml", ".json"))


def _kuberay_docs() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p in sorted(KUBERAY.glob("*.yaml")) for d in _load(p)]


def _cluster_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The RayCluster spec(s) inside a RayCluster / RayJob / RayService manifest."""
    spec = doc["spec"]
    kind = doc["kind"]
    if kind == "RayCluster":
        return [spec]
    if kind == "RayJob":
        return [spec["rayClusterSpec"]]
    if kind == "RayService":
        return [spec["rayClusterConfig"]]
    raise AssertionError(f"unexpected kind {kind}")


def _groups(cspec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    workers = [(g["groupName"], g) for g in cspec.get("workerGroupSpecs", [])]
    return [("head", cspec["headGroupSpec"]), *workers]


def _gpu_count(container: dict[str, Any], which: str) -> int:
    return int(container.get("resources", {}).get(which, {}).get("nvidia.com/gpu", 0))


def _check_runtime_env(env: dict[str, Any], where: str) -> None:
    """A runtime env is valid for Ray and pins pip packages exactly as pyproject (base deps + cpu extra)."""
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**env)  # raises on unknown fields / bad types
    proj = _pyproject()["project"]
    pinned = _reqs(proj["dependencies"] + proj["optional-dependencies"]["cpu"])
    pip = env.get("pip", {})
    pkgs = pip["packages"] if isinstance(pip, dict) else pip
    got = _reqs([p.split("#")[0].strip() for p in pkgs])
    for name, req in got.items():
        assert name in pinned, f"{where}: pip package {req} is not in pyproject.toml; add it there first"
        assert str(req.specifier) == str(pinned[name].specifier), (
            f"{where}: {name}{req.specifier} but pyproject pins {name}{pinned[name].specifier}; align them"
        )
    missing = set(_reqs(proj["dependencies"])) - set(got)
    assert not missing, f"{where}: pip lacks pyproject dependencies {sorted(missing)}"
    assert got["ray"].extras == pinned["ray"].extras, f"{where}: ray extras differ from pyproject"
    assert env.get("env_vars", {}).get("HF_HUB_OFFLINE") == "1", f"{where}: set env_vars.HF_HUB_OFFLINE='1'"


def _referenced_jobs() -> dict[str, list[str]]:
    """`python -m jobs.X` references in cluster/ files and the jobs' own docstrings -> where they appear."""
    found: dict[str, list[str]] = {}
    for p in sorted(CLUSTER.rglob("*")) + sorted((REPO / "jobs").glob("*.py")):
        if p.is_file() and p.suffix in (".yaml", ".yml", ".json", ".md", ".py"):
            for m in JOB_RE.finditer(p.read_text()):
                found.setdefault(m.group(1), []).append(str(p.relative_to(REPO)))
    return found


# ----------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("path", _config_files(), ids=lambda p: str(p.relative_to(CLUSTER)))
def test_every_config_parses(path: Path) -> None:
    docs = _load(path)
    assert docs and all(isinstance(d, dict) for d in docs), f"{path}: expected mapping document(s)"


def test_expected_files_exist() -> None:
    for rel in ("cluster.yaml", "runtime_env.yaml", "README.md", "kuberay/raycluster.yaml",
                "kuberay/rayjob.yaml", "kuberay/rayservice.yaml", "grafana/llmrec-dashboard.json"):
        assert (CLUSTER / rel).is_file(), f"cluster/{rel} is missing"


def test_launcher_config_valid_for_ray_and_pinned() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((CLUSTER / "cluster.yaml").read_text())
    validate_config(prepare_config(raw))  # Ray's own schema + defaults, as `ray up` does
    v = _ray_version()
    cpu_image, gpu_image = f"rayproject/ray:{v}-py311", f"rayproject/ray:{v}-py311-gpu"
    docker = raw["docker"]
    assert {docker["image"], docker["head_image"], docker["worker_image"]} == {cpu_image}
    types = raw["available_node_types"]
    assert {"cpu-worker", "gpu-embed", "gpu-train"} <= set(types), sorted(types)
    assert types[raw["head_node_type"]]["resources"].get("GPU", 0) == 0
    for name, t in types.items():
        n_gpu = t.get("resources", {}).get("GPU", 0)
        if name.startswith("gpu-"):
            assert n_gpu >= 1, f"node type {name}: resources.GPU missing"
            assert t["docker"]["worker_image"] == gpu_image, f"{name}: use {gpu_image}"
            assert "--gpus all" in t["docker"]["worker_run_options"]
            cmds = " ".join(t["worker_setup_commands"])
            assert "[gpu]" in cmds and "[cpu]" not in cmds, f"{name}: install the gpu extra: {cmds}"
        else:
            assert n_gpu == 0, f"CPU node type {name} declares GPUs"
        if name != raw["head_node_type"]:
            assert 0 <= t["min_workers"] <= t["max_workers"], f"{name}: min/max workers"
    torch_pin = next(iter(_reqs(_pyproject()["project"]["optional-dependencies"]["cpu"])["torch"].specifier))
    for key in ("head_setup_commands", "worker_setup_commands"):
        cmds = " ".join(raw[key])
        assert "[cpu]" in cmds and f"torch=={torch_pin.version}" in cmds, f"{key}: {cmds}"
    start = " ".join(raw["head_start_ray_commands"] + raw["worker_start_ray_commands"])
    assert start.count("RAY_AUTH_MODE=token") == 2, "token auth on head and workers"


def test_runtime_env_matches_pyproject() -> None:
    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    _check_runtime_env(env, "cluster/runtime_env.yaml")
    assert env["working_dir"] == "."
    assert {".git", ".venv", "runs"} <= set(env["excludes"])


def test_kuberay_versions_images_and_gpus() -> None:
    v = _ray_version()
    kinds = set()
    for path, doc in _kuberay_docs():
        if doc["apiVersion"] != "ray.io/v1" and not path.name.startswith("ray"):
            continue  # redis.yaml: plain Kubernetes objects
        if doc["kind"] == "NetworkPolicy":  # rayservice.yaml's companion: who may connect
            continue
        assert doc["apiVersion"] == "ray.io/v1", path
        kinds.add(doc["kind"])
        for cspec in _cluster_specs(doc):
            assert str(cspec["rayVersion"]) == v, f"{path}: rayVersion {cspec['rayVersion']} != pyproject {v}"
            assert cspec.get("authOptions", {}).get("mode") == "token", f"{path}: enable token auth"
            saw_gpu_group = False
            for gname, group in _groups(cspec):
                for c in group["template"]["spec"]["containers"]:
                    image, req, lim = c["image"], _gpu_count(c, "requests"), _gpu_count(c, "limits")
                    assert image in (f"rayproject/ray:{v}-py311", f"rayproject/ray:{v}-py311-gpu"), (
                        f"{path} {gname}: image {image} does not match ray {v}")
                    if "gpu" in gname:
                        saw_gpu_group = True
                        assert req >= 1 and lim == req, f"{path} {gname}: nvidia.com/gpu requests/limits"
                        assert image.endswith("-gpu"), f"{path} {gname}: GPU group needs the -gpu image"
                        n_gpus = group["rayStartParams"].get("num-gpus")
                        assert n_gpus == str(req), f"{path} {gname}: num-gpus {n_gpus} != {req}"
                    else:
                        assert req == lim == 0 and not image.endswith("-gpu"), f"{path} {gname}: CPU group"
            assert saw_gpu_group, f"{path}: no GPU worker group"
    assert kinds == {"RayCluster", "RayJob", "RayService"}, kinds


def test_rayjob_runs_the_pipeline_with_valid_runtime_env() -> None:
    doc = yaml.safe_load((KUBERAY / "rayjob.yaml").read_text())
    env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
    _check_runtime_env(env, "rayjob.yaml runtimeEnvYAML")
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs.pipeline"], argv
    from llmrec.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["pipeline", *argv[3:]])  # the entrypoint's flags are the CLI's
    assert args.command == "pipeline" and args.out.startswith("/mnt/runs/")


def test_every_referenced_job_module_has_main() -> None:
    refs = _referenced_jobs()
    for name in ("jobs.pipeline", "jobs.prepare", "jobs.embed_catalog", "jobs.build_index",
                 "jobs.train_scorer", "jobs.evaluate", "jobs.deploy"):
        assert name in refs, f"{name} is not documented anywhere in cluster/ or jobs/"
    for name, where in refs.items():
        mod = importlib.import_module(name)
        assert callable(getattr(mod, "main", None)), f"{name} (referenced in {where}) has no main()"


def _serve_apps() -> list[tuple[str, dict[str, Any]]]:
    apps = []
    svc = next(yaml.safe_load_all((KUBERAY / "rayservice.yaml").read_text()))
    for a in yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"]:
        apps.append(("kuberay/rayservice.yaml", a))
    if (CLUSTER / "serve.yaml").is_file():
        for a in yaml.safe_load((CLUSTER / "serve.yaml").read_text())["applications"]:
            apps.append(("serve.yaml", a))
    return apps


def test_serve_configs_validate_and_import() -> None:
    from ray.serve.schema import ServeDeploySchema

    svc = next(yaml.safe_load_all((KUBERAY / "rayservice.yaml").read_text()))
    ServeDeploySchema(**yaml.safe_load(svc["spec"]["serveConfigV2"]))  # Serve's own config schema
    if (CLUSTER / "serve.yaml").is_file():
        ServeDeploySchema(**yaml.safe_load((CLUSTER / "serve.yaml").read_text()))
    for where, app in _serve_apps():
        assert app["import_path"] == "llmrec.serve.app:build_app", f"{where}: {app['import_path']}"
        mod_name, attr = app["import_path"].split(":")
        mod = importlib.import_module(mod_name)  # a missing module must fail, not skip
        assert callable(getattr(mod, attr)), f"{where}: {app['import_path']} is not callable"


def test_grafana_panels_cover_the_serve_metrics() -> None:
    dash = json.loads((CLUSTER / "grafana" / "llmrec-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    text = "\n".join(exprs)
    for m in METRICS:
        assert m in text, f"no panel queries {m}"
    for hist in ("ray_llmrec_recommend_latency_ms_bucket", "ray_llmrec_feedback_latency_ms_bucket"):
        qs = {float(q) for q in re.findall(rf"histogram_quantile\(([0-9.]+),[^\n]*{hist}", text)}
        assert qs == {0.5, 0.99}, f"{hist}: expected p50 and p99 panels, got quantiles {sorted(qs)}"
    for e in exprs:
        if "_total" in e or "_bucket" in e:
            assert "rate(" in e, f"counter queried without rate(): {e}"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "duplicate panel ids"


@pytest.mark.parametrize("path", sorted((CLUSTER / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_job_config_files_parse_with_their_command(path: Path) -> None:
    """cluster/jobs/<name>.yaml belongs to jobs.<name>, and its flags are accepted by that CLI subcommand."""
    from jobs._entry import expand_config

    mod = importlib.import_module(f"jobs.{path.stem}")
    from llmrec.cli import build_parser

    parser = build_parser()
    argv = expand_config(["--config", str(path)])
    assert argv, f"{path} is empty"
    args = parser.parse_args([mod.COMMAND, *argv])
    assert args.command == mod.COMMAND


def test_serve_app_args_are_accepted_by_build_app(tmp_path: Path) -> None:
    """Every config's app args are known to build_app: with a run folder that has no artifacts the only
    complaint is the missing artifact (unknown or malformed args are refused before that check)."""
    build_app = importlib.import_module("llmrec.serve.app").build_app
    for where, app in _serve_apps():
        args = {**app.get("args", {}), "run_dir": str(tmp_path / "empty-run")}
        with pytest.raises(ValueError, match="meta.json") as e:
            build_app(args)
        assert "unknown" not in str(e.value), f"{where}: {e.value}"


def test_rayservice_takes_the_api_token_from_a_secret_and_limits_who_connects() -> None:
    """The manifest used to set no API token at all and to listen on 0.0.0.0 with no NetworkPolicy."""
    from llmrec.serve.app import _KNOWN_ARGS

    docs = list(yaml.safe_load_all((KUBERAY / "rayservice.yaml").read_text()))
    svc, policy = docs[0], next(d for d in docs if d["kind"] == "NetworkPolicy")
    args = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert "auth_token" not in args and args["auth_token_env"] in ("LLMREC_AUTH_TOKEN",)
    assert set(args) <= _KNOWN_ARGS
    cfg = svc["spec"]["rayClusterConfig"]
    pods = [cfg["headGroupSpec"]["template"]["spec"]]
    pods += [g["template"]["spec"] for g in cfg["workerGroupSpecs"]]
    for pod in pods:  # replicas may run on any node: every pod has the variable, from the Secret
        env = {e["name"]: e for e in pod["containers"][0].get("env", [])}
        token = env[args["auth_token_env"]]["valueFrom"]["secretKeyRef"]
        assert token == {"name": "llmrec-api", "key": "token"}
        state = env[args["state_url_env"]]["valueFrom"]["secretKeyRef"]  # Redis URL + password: a Secret
        assert state == {"name": "llmrec-redis", "key": "url"}
    redis_docs = list(yaml.safe_load_all((KUBERAY / "redis.yaml").read_text()))
    dep = next(d for d in redis_docs if d["kind"] == "Deployment")
    dep = dep["spec"]["template"]["spec"]["containers"][0]
    assert dep["args"][dep["args"].index("--appendfsync") + 1] == "always" and "--requirepass" in dep["args"]
    assert dep["env"][0]["valueFrom"]["secretKeyRef"] == {"name": "llmrec-redis", "key": "password"}
    rules = policy["spec"]["ingress"]
    api_rule = next(r for r in rules if any(p["port"] == 8000 for p in r.get("ports", [])))
    assert all("podSelector" in f for f in api_rule["from"])  # never open to everyone
    local = yaml.safe_load((CLUSTER / "serve.yaml").read_text())["applications"][0]["args"]
    assert "auth_token" not in local  # a token never sits in a config file
