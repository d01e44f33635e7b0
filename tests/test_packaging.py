"""Packaging contracts: what pyproject declares matches what the code imports, extras are exclusive where
they must be, optional imports name their extra, `llmrec --version`, the jobs shims, and the built wheel.

References: the source tree's own imports (ast), the installed distributions' metadata, and the wheel that
`pip wheel` builds from this checkout.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from importlib.metadata import packages_distributions
from pathlib import Path

import numpy as np
import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import llmrec

REPO = Path(__file__).resolve().parents[1]
FAISS_DISTS = {"faiss-cpu", "faiss-gpu", "faiss-gpu-cu12", "faiss-gpu-cu11", "faiss"}
# modules imported only where an optional feature runs, each with the error that names what to install
OPTIONAL_IMPORTS = {"faiss": "cpu|gpu (llmrec.device.import_faiss)", "fsspec": "storage: names the package",
                    "matplotlib": "eval", "threadpoolctl": "eval", "implicit": "eval", "redis": "redis"}


def _project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _names(specs: list[str]) -> set[str]:
    return {canonicalize_name(Requirement(s).name) for s in specs}


def _third_party_imports() -> dict[str, set[str]]:
    """{top-level module: files} for every import of a non-stdlib, non-llmrec module under llmrec/."""
    found: dict[str, set[str]] = {}
    for path in (REPO / "llmrec").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods = [node.module]
            else:
                continue
            for m in mods:
                top = m.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("llmrec", "__future__"):
                    found.setdefault(top, set()).add(str(path.relative_to(REPO)))
    return found


def test_every_imported_distribution_is_declared() -> None:
    proj = _project()
    base = _names(proj["dependencies"])
    extras = {k: _names(v) for k, v in proj["optional-dependencies"].items()}
    dist_of = packages_distributions()
    imports = _third_party_imports()
    assert {"fastapi", "starlette", "pydantic", "yaml", "torch", "ray"} <= set(imports), sorted(imports)
    for module, files in sorted(imports.items()):
        dists = {canonicalize_name(d) for d in dist_of.get(module, [])}
        assert dists, f"{module} (imported in {sorted(files)}) is not installed here"
        if module in OPTIONAL_IMPORTS:
            assert dists & set().union(*extras.values()) or module == "fsspec", (module, dists)
            continue
        assert dists & base, f"{module} is imported in {sorted(files)}; {sorted(dists)} is not a dependency"
    # the extras' optional modules: declared where llmrec.optional says, never in the base dependencies
    from llmrec.optional import EXTRA_OF

    for dist, extra in EXTRA_OF.values():
        assert canonicalize_name(dist) in extras[extra], f"{dist} must be in the [{extra}] extra"
        assert canonicalize_name(dist) not in base, f"{dist} belongs to [{extra}], not the base dependencies"


def test_no_unused_dependencies_and_exclusive_faiss() -> None:
    proj = _project()
    base = _names(proj["dependencies"])
    extras = {k: _names(v) for k, v in proj["optional-dependencies"].items()}
    assert not base & {"tqdm", "httpx", "implicit", "matplotlib"}, base
    assert extras["eval"] >= {"implicit", "matplotlib"}
    # exactly one faiss build per extra, the official wheels, and nowhere else
    assert extras["cpu"] & FAISS_DISTS == {"faiss-cpu"}
    assert extras["gpu"] & FAISS_DISTS == {"faiss-gpu"}
    assert not (base | extras["eval"] | extras["dev"]) & FAISS_DISTS
    gpu = [Requirement(s) for s in proj["optional-dependencies"]["gpu"] if Requirement(s).name == "faiss-gpu"]
    assert gpu[0].specifier.contains("1.15.0") and not gpu[0].specifier.contains("1.14.3")
    reqs = {canonicalize_name(Requirement(s).name): Requirement(s) for s in proj["dependencies"]}
    tf = reqs["transformers"].specifier
    assert not tf.contains("4.55.4") and tf.contains("4.56.0")
    ray = reqs["ray"].specifier
    assert ray.contains("2.60.0") and ray.contains("2.60.9") and not ray.contains("2.61.0"), ray
    build = tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]["requires"]
    (st,) = [Requirement(b) for b in build if Requirement(b).name == "setuptools"]
    assert not st.specifier.contains("76.9") and st.specifier.contains("77.0")  # PEP 639 licence string


def test_constraints_pin_every_dependency_within_its_range() -> None:
    """constraints.txt (images, CI) pins each dependency of llmrec[cpu,eval] inside pyproject's range."""
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            pins[canonicalize_name(req.name)] = spec.version
    proj = _project()
    opt = proj["optional-dependencies"]
    for s in proj["dependencies"] + opt["cpu"] + opt["eval"] + opt["gpu"]:
        req = Requirement(s)
        name = canonicalize_name(req.name)
        assert name in pins, f"constraints.txt lacks {name}; run `make constraints`"
        assert req.specifier.contains(pins[name]), f"constraints.txt {name}=={pins[name]} is outside {req}"


def test_optional_imports_name_their_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from llmrec.eval.baselines import ALSRecommender
    from llmrec.eval.report import plot_metrics
    from llmrec.optional import MissingExtraError

    monkeypatch.setitem(sys.modules, "implicit", None)  # `import implicit...` now raises ImportError
    monkeypatch.setitem(sys.modules, "implicit.als", None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingExtraError, match=r"ALS baseline needs implicit.*pip install 'llmrec\[eval\]'"):
        ALSRecommender().fit(None, None)  # type: ignore[arg-type]
    with pytest.raises(MissingExtraError, match=r"metrics.png\) needs matplotlib.*'llmrec\[eval\]'"):
        plot_metrics({}, tmp_path / "m.png")


def test_two_faiss_builds_are_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """faiss-cpu (installed here) and faiss-gpu (a second dist-info on sys.path) share one `faiss` module."""
    from llmrec import device

    fake = tmp_path / "faiss_gpu-1.15.1.dist-info"
    fake.mkdir()
    (fake / "METADATA").write_text("Metadata-Version: 2.1\nName: faiss-gpu\nVersion: 1.15.1\n")
    device.installed_faiss_distributions.cache_clear()
    try:
        assert device.installed_faiss_distributions() == ("faiss-cpu",)
        assert device.import_faiss() is not None
        monkeypatch.syspath_prepend(str(tmp_path))
        device.installed_faiss_distributions.cache_clear()
        want = r"faiss-cpu, faiss-gpu.*pip uninstall -y faiss-cpu faiss-gpu"
        with pytest.raises(device.FaissConflictError, match=want):
            device.import_faiss()
        from llmrec.index.item_index import ItemIndex

        with pytest.raises(device.FaissConflictError):
            ItemIndex.build(np.eye(2, dtype=np.float32), ["a", "b"], kind="flat", device="cpu")
    finally:
        monkeypatch.undo()
        device.installed_faiss_distributions.cache_clear()


def test_version_flag_and_single_version_source() -> None:
    out = subprocess.run([sys.executable, "-m", "llmrec", "--version"], capture_output=True, text=True,
                         cwd=REPO, check=True).stdout
    assert out.strip() == f"llmrec {llmrec.__version__}"
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" in pyproject["project"]["dynamic"] and "version" not in pyproject["project"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "llmrec.__version__"}


def test_jobs_shims_are_the_packaged_modules() -> None:
    import jobs._entry
    import jobs.deploy
    import jobs.pipeline
    import llmrec.jobs._entry
    import llmrec.jobs.deploy
    import llmrec.jobs.pipeline

    assert jobs.pipeline is llmrec.jobs.pipeline and jobs.deploy is llmrec.jobs.deploy
    assert jobs._entry is llmrec.jobs._entry
    for mod in ("jobs.prepare", "llmrec.jobs.prepare"):  # both spellings run as `python -m`
        r = subprocess.run([sys.executable, "-m", mod, "--help"], capture_output=True, text=True, cwd=REPO)
        assert r.returncode == 0 and "usage: llmrec prepare" in r.stdout, (mod, r.stderr[-500:])


def test_wheel_ships_llmrec_only_with_its_metadata(tmp_path: Path) -> None:
    """`pip wheel .` (no build isolation: offline, with this environment's setuptools) holds llmrec and
    llmrec.jobs, not the top-level `jobs` shims, and declares the licence, version and extras."""
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation",
                        "-q", "-w", str(tmp_path)], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    (whl,) = tmp_path.glob("llmrec-*.whl")
    names = zipfile.ZipFile(whl).namelist()
    assert "llmrec/jobs/pipeline.py" in names and "llmrec/embed/encoder.py" in names
    assert not [n for n in names if n.startswith(("jobs/", "tests/", "benchmarks/"))]
    meta = zipfile.ZipFile(whl).read(f"llmrec-{llmrec.__version__}.dist-info/METADATA").decode()
    assert "License-Expression: Apache-2.0" in meta
    for extra in ("cpu", "gpu", "eval", "dev"):
        assert f"Provides-Extra: {extra}" in meta
    assert "Requires-Dist: faiss-gpu>=1.15; extra == \"gpu\"" in meta
