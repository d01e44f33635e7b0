"""Static checks of everything a cluster user runs from cluster/ and the Dockerfile: it parses, it runs the
Ray of constraints.txt (inside pyproject's range), the KubeRay manifests run the image the Dockerfile builds,
it asks for GPUs where GPU work runs, and every entrypoint / import path it names exists.

No cluster is started and no image is built here (tests/test_local_cluster.py starts a local cluster); each
check compares a config against the repository itself (pyproject's ranges, constraints.txt, the Dockerfile
and Makefile, the jobs modules, the CLI parsers, Ray's own launcher and Serve schemas).
"""

from __future__ import annotations

import importlib
import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import tomllib
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
JOB_RE = re.compile(r"python3? -m ((?:llmrec\.)?jobs\.[A-Za-z_][A-Za-z0-9_]*)")
# RayService fields KubeRay stopped reading in v1.1 (ray-project/kuberay#1656, #1664, #1665: the operator no
# longer judges Serve health itself); RayJob's base64 `runtimeEnv` gave way to runtimeEnvYAML in v1.0
DEPRECATED_KUBERAY_FIELDS = (
    "serviceUnhealthySecondThreshold", "deploymentUnhealthySecondThreshold", "runtimeEnv"
)


# ----------------------------------------------------------------------------------------------- helpers
def _pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _reqs(specs: list[str]) -> dict[str, Requirement]:
    return {Requirement(s).name.lower(): Requirement(s) for s in specs}


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            pins[req.name.lower()] = next(iter(req.specifier)).version
    return pins


def _ray_version() -> str:
    """The Ray the images run: constraints.txt's pin, which must lie in pyproject's ray range."""
    ray_req = _reqs(_pyproject()["project"]["dependencies"])["ray"]
    pin = _constraints()["ray"]
    assert ray_req.specifier.contains(pin), f"constraints.txt ray=={pin} is outside pyproject's {ray_req}"
    return pin


def _image() -> tuple[str, str]:
    """(CPU image, GPU image) the Makefile's `image` target tags: $(IMAGE):<llmrec version>[-gpu]."""
    import llmrec

    m = re.search(r"^IMAGE \?= (\S+)$", (REPO / "Makefile").read_text(), re.M)
    assert m, "Makefile must define IMAGE ?= <registry>/llmrec"
    return f"{m.group(1)}:{llmrec.__version__}", f"{m.group(1)}:{llmrec.__version__}-gpu"


def _load(path: Path) -> list[Any]:
    if path.suffix == ".json":
        return [json.loads(path.read_text())]
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _config_files() -> list[Path]:
    return sorted(p for p in CLUSTER.rglob("*") if p.suffix in (".yaml", ".yml", ".json"))


def _kuberay_docs() -> list[tuple[Path, dict[str, Any]]]:
    """The KubeRay objects of cluster/kuberay (not the plain Kubernetes ones beside them: NetworkPolicy,
    redis.yaml's Deployment and Service)."""
    return [(p, d) for p in sorted(KUBERAY.glob("*.yaml")) for d in _load(p)
            if str(d.get("apiVersion", "")).startswith("ray.io/")]


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
    """A runtime env is valid for Ray and pins pip packages exactly as pyproject (base deps + cpu, eval)."""
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**env)  # raises on unknown fields / bad types
    proj = _pyproject()["project"]
    opt = proj["optional-dependencies"]
    pinned = _reqs(proj["dependencies"] + opt["cpu"] + opt["eval"])
    pip = env.get("pip", {})
    pkgs = pip["packages"] if isinstance(pip, dict) else pip
    got = _reqs([p.split("#")[0].strip() for p in pkgs])
    for name, req in got.items():
        assert name in pinned, f"{where}: pip package {req} is not in pyproject.toml; add it there first"
        assert str(req.specifier) == str(pinned[name].specifier), (
            f"{where}: {name}{req.specifier} but pyproject pins {name}{pinned[name].specifier}; align them"
        )
    missing = set(_reqs(proj["dependencies"] + opt["eval"])) - set(got)
    assert not missing, f"{where}: pip lacks pyproject dependencies {sorted(missing)}"
    assert got["ray"].extras == pinned["ray"].extras, f"{where}: ray extras differ from pyproject"
    assert env.get("env_vars", {}).get("HF_HUB_OFFLINE") == "1", f"{where}: set env_vars.HF_HUB_OFFLINE='1'"


def _referenced_jobs() -> dict[str, list[str]]:
    """`python -m [llmrec.]jobs.X` references in cluster/ files, the README and the jobs' own docstrings."""
    found: dict[str, list[str]] = {}
    files = sorted(CLUSTER.rglob("*")) + sorted((REPO / "llmrec" / "jobs").glob("*.py"))
    files.append(REPO / "README.md")
    for p in files:
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
            assert "[gpu,eval]" in cmds and "[cpu" not in cmds, f"{name}: install the gpu extra: {cmds}"
        else:
            assert n_gpu == 0, f"CPU node type {name} declares GPUs"
        if name != raw["head_node_type"]:
            assert 0 <= t["min_workers"] <= t["max_workers"], f"{name}: min/max workers"
    torch_pin = next(iter(_reqs(_pyproject()["project"]["optional-dependencies"]["cpu"])["torch"].specifier))
    for key in ("head_setup_commands", "worker_setup_commands"):
        cmds = " ".join(raw[key])
        assert "[cpu,eval]" in cmds and f"torch=={torch_pin.version}" in cmds, f"{key}: {cmds}"
        assert "-c /home/ray/llmrec/constraints.txt" in cmds, f"{key}: install with the constraints"
    start = " ".join(raw["head_start_ray_commands"] + raw["worker_start_ray_commands"])
    assert start.count("RAY_AUTH_MODE=token") == 2, "token auth on head and workers"


def test_runtime_env_matches_pyproject() -> None:
    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    _check_runtime_env(env, "cluster/runtime_env.yaml")
    assert env["working_dir"] == "."
    assert {".git", ".venv", "runs"} <= set(env["excludes"])


def test_kuberay_versions_images_and_gpus() -> None:
    v = _ray_version()
    cpu_image, gpu_image = _image()
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
                    assert image in (cpu_image, gpu_image), (
                        f"{path} {gname}: image {image}; run the llmrec image {cpu_image} / {gpu_image}")
                    if "gpu" in gname:
                        saw_gpu_group = True
                        assert req >= 1 and lim == req, f"{path} {gname}: nvidia.com/gpu requests/limits"
                        assert image == gpu_image, f"{path} {gname}: GPU group needs {gpu_image}"
                        n_gpus = group["rayStartParams"].get("num-gpus")
                        assert n_gpus == str(req), f"{path} {gname}: num-gpus {n_gpus} != {req}"
                    else:
                        assert req == lim == 0 and image == cpu_image, f"{path} {gname}: CPU group"
            assert saw_gpu_group, f"{path}: no GPU worker group"
    assert kinds == {"RayCluster", "RayJob", "RayService"}, kinds


def test_kuberay_manifests_use_no_deprecated_fields() -> None:
    def keys(node: Any) -> set[str]:
        if isinstance(node, dict):
            return set(node) | set().union(*(keys(v) for v in node.values()))
        if isinstance(node, list):
            return set().union(*(keys(v) for v in node)) if node else set()
        return set()

    for path, doc in _kuberay_docs():
        found = keys(doc) & set(DEPRECATED_KUBERAY_FIELDS)
        assert not found, f"{path}: fields deprecated since KubeRay 1.1: {sorted(found)}"


def test_dockerfile_builds_the_manifests_image() -> None:
    """The Dockerfile starts from the Ray image of the pinned version, installs torch and llmrec with one
    faiss extra at constraints.txt's versions, and holds what the manifests run; the Makefile tags it."""
    text = (REPO / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S*)$", text, re.M))
    assert (args["RAY_VERSION"], args["PYTHON_TAG"], args["VARIANT"]) == (_ray_version(), "py311", "cpu")
    stages = re.findall(r"^FROM (\S+)(?: AS (\S+))?$", text, re.M)
    assert ("rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}", "base-cpu") in stages
    assert ("rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-gpu", "base-gpu") in stages
    assert stages[-1] == ("base-${VARIANT}", "")
    assert 'pip install --no-cache-dir -c constraints.txt ".[${VARIANT},eval]"' in text
    assert "torch==${torch_pin}" in text and "download.pytorch.org/whl/cpu" in text
    for src in re.findall(r"^COPY --chown=ray:users (.+) \S+$", text, re.M):
        for name in src.split():
            assert (REPO / name).exists(), f"Dockerfile copies {name}, which is not in the repository"
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", "runs", ".git"} <= set(ignored)
    assert "HF_HUB_OFFLINE=1" in text
    make = (REPO / "Makefile").read_text()
    cpu_image, gpu_image = _image()
    assert "docker build" in make and "--build-arg VARIANT=$(VARIANT)" in make and "$(IMAGE_TAG)" in make
    # every image a manifest names is one of the two the Makefile builds
    images = {c["image"] for _, d in _kuberay_docs() for cs in _cluster_specs(d) for _, g in _groups(cs)
              for c in g["template"]["spec"]["containers"]}
    assert images == {cpu_image, gpu_image}, images


def test_rayjob_runs_the_pipeline_from_the_image() -> None:
    doc = yaml.safe_load((KUBERAY / "rayjob.yaml").read_text())
    env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**env)
    assert "pip" not in env and "working_dir" not in env, "the image holds the code and its dependencies"
    assert env["env_vars"]["HF_HUB_OFFLINE"] == "1"
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "llmrec.jobs.pipeline"], argv
    from llmrec.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["pipeline", *argv[3:]])  # the entrypoint's flags are the CLI's
    assert args.command == "pipeline" and args.out.startswith("/mnt/runs/")


def test_every_referenced_job_module_has_main() -> None:
    refs = _referenced_jobs()
    for name in ("jobs.pipeline", "jobs.prepare", "jobs.embed_catalog", "jobs.build_index",
                 "jobs.train_scorer", "jobs.evaluate", "jobs.deploy"):
        assert name in refs or f"llmrec.{name}" in refs, f"{name} is documented nowhere (cluster/, jobs)"
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


def test_cluster_serve_configs_listen_on_every_node_behind_the_token(tmp_path: Path) -> None:
    """Cluster configs: a proxy per node on 0.0.0.0 and every route behind the app token, read from a file
    (serve.yaml) or an environment variable that the RayService fills from a Secret on every pod (serve.yaml's
    header documents the loopback override)."""
    svc = next(yaml.safe_load_all((KUBERAY / "rayservice.yaml").read_text()))
    for where, cfg in (("serve.yaml", yaml.safe_load((CLUSTER / "serve.yaml").read_text())),
                       ("rayservice.yaml", yaml.safe_load(svc["spec"]["serveConfigV2"]))):
        assert cfg["proxy_location"] == "EveryNode" and cfg["http_options"]["host"] == "0.0.0.0", where
        for app in cfg["applications"]:
            args = app["args"]
            assert (
                (args.get("auth_token_file") or args.get("auth_token_env")) and not args.get("auth_token")
            ), where
    env_name = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"][0]["args"]["auth_token_env"]
    for gname, group in _groups(svc["spec"]["rayClusterConfig"]):
        pod = group["template"]["spec"]
        env = {e["name"]: e for c in pod["containers"] for e in c.get("env", [])}
        assert "secretKeyRef" in env.get(env_name, {}).get("valueFrom", {}), (
            f"rayservice {gname}: fill {env_name} from a Secret (secretKeyRef) in every pod")
    # the documented local override is accepted by the deploy job's argument handling
    from llmrec.jobs.deploy import app_args, load_app_config

    _, entry = load_app_config(CLUSTER / "serve.yaml")
    assert app_args(entry, None, ["auth_token_file=null"])["auth_token_file"] is None
    assert "--http-host 127.0.0.1 --set auth_token_file=null" in (CLUSTER / "serve.yaml").read_text()


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
    # the users gauge is per shard and every Ingress replica exports it: max per shard, then the sum
    users = [e for e in exprs if "ray_llmrec_state_users" in e]
    assert users and all(re.match(r"sum\(max by \(shard\) \(ray_llmrec_state_users", e) for e in users), users
    assert any("by (le, replica)" in e for e in exprs), "no per-replica latency panel (ray.serve.metrics)"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "duplicate panel ids"


@pytest.mark.parametrize("path", sorted((CLUSTER / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_job_config_files_parse_with_their_command(path: Path) -> None:
    """cluster/jobs/<name>.yaml belongs to jobs.<name>, and its flags are accepted by that CLI subcommand."""
    from llmrec.cli import build_parser
    from llmrec.jobs._entry import expand_config

    mod = importlib.import_module(f"llmrec.jobs.{path.stem}")
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
