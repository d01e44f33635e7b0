"""The module layers of llmrec: a module may import its own layer and the layers below, never one above.

The dependency graph is read from the source (AST), so it sees every import: module level, inside functions
(the lazy imports of torch-heavy code) and under `if TYPE_CHECKING:`, plus `importlib.import_module` of a
literal llmrec module name. A new module must be placed in `LAYERS` (a test fails until it is); an import
that runs back up fails with the importing file, its line and both layers. `python -m pytest -s
tests/test_layers.py` prints the layers with what each one imports.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "llmrec"

# One literal table (docs/design.md, "Module layers", names the same layers). An entry is a module or a
# package (then every module under it); "llmrec" is the package's own __init__ only: `__version__` and the
# lazy table of the public API (names resolved by importlib at attribute access, no import statement).
LAYERS: dict[int, tuple[str, ...]] = {
    0: (  # foundations: names, shared types, numeric helpers, artifact and URI I/O, logs, devices, Ray
        "llmrec",
        "llmrec.schema",
        "llmrec.protocol",
        "llmrec.cooc",
        "llmrec.metrics",
        "llmrec.artifacts",
        "llmrec.storage",
        "llmrec.log",
        "llmrec.optional",
        "llmrec.device",
        "llmrec.raysetup",
        "llmrec.config",
    ),
    1: ("llmrec.data", "llmrec.embed", "llmrec.index", "llmrec.state"),  # stages that need no model
    2: ("llmrec.scorer",),  # the trained model: training and inference
    # uses of the model: evaluation, the learning loop, and serving's pure ranking core with what it reads of
    # a user and a query (typed against protocol's Ranker / UserEncoder; evaluation scores the serving text
    # fallback with it, `served_text`)
    # the encoder fine-tune reads the evaluation's leave-last-out split and the scorer's target kinds
    3: ("llmrec.eval", "llmrec.learn", "llmrec.finetune", "llmrec.serve.recommend_core",
        "llmrec.serve.user_view"),
    4: ("llmrec.serve",),  # online serving (reads learn's registry)
    5: ("llmrec.eval.replay", "llmrec.batch"),  # offline drivers of the serving ranking
    6: ("llmrec.cli", "llmrec.commands", "llmrec.jobs", "llmrec.__main__"),  # entry points
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def entry_of(mod: str) -> tuple[str, int] | None:
    """(entry, layer) of the longest LAYERS entry that is `mod` or a package above it ("llmrec" only
    exactly)."""
    best: tuple[str, int] | None = None
    for layer, entries in LAYERS.items():
        for e in entries:
            if mod == e or (e != "llmrec" and mod.startswith(e + ".")):
                if best is None or len(e) > len(best[0]):
                    best = (e, layer)
    return best


def layer_of(mod: str) -> int | None:
    """The layer of `mod` (`entry_of`), None when no entry covers it."""
    found = entry_of(mod)
    return None if found is None else found[1]


def _target(name: str, modules: dict[str, Path]) -> str:
    """The llmrec module an imported dotted name refers to (the longest existing module prefix)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        cand = ".".join(parts[:n])
        if cand in modules:
            return cand
    return name


def imports_of(mod: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported llmrec module, line) for every import in the file, at any depth."""
    out: list[tuple[str, int]] = []
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package, one level up per extra dot
                base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            names = [f"{prefix}.{a.name}" for a in node.names]  # `from pkg import module` names the module
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id) == "import_module"
            and node.args
        ):
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                names = [arg.value]
            elif isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
                names = [str(arg.values[0].value).rstrip(".")]  # f"llmrec.commands.{name}" -> the package
        out += [(_target(n, modules), node.lineno) for n in names if n == "llmrec" or n.startswith("llmrec.")]
    return out


def dependency_graph() -> dict[str, list[tuple[str, int]]]:
    """{module: [(imported llmrec module, line), ...]} over every module of the package."""
    modules = all_modules()
    return {m: imports_of(m, p, modules) for m, p in modules.items()}


def upward_imports(graph: dict[str, list[tuple[str, int]]]) -> list[str]:
    """One line per import of a higher layer: file:line, importer (layer) -> imported (layer)."""
    modules = all_modules()
    bad = []
    for mod, deps in sorted(graph.items()):
        lm = layer_of(mod)
        for dep, line in deps:
            ld = layer_of(dep)
            if lm is not None and ld is not None and ld > lm:
                rel = modules[mod].relative_to(ROOT)
                bad.append(f"{rel}:{line}: {mod} (layer {lm}) imports {dep} (layer {ld})")
    return bad


def describe(graph: dict[str, list[tuple[str, int]]]) -> str:
    """The layers, each entry with the other entries its modules import."""
    uses: dict[str, set[str]] = defaultdict(set)
    for mod, deps in graph.items():
        src = entry_of(mod)
        for dep, _ in deps:
            dst = entry_of(dep)
            if src is not None and dst is not None and dst[0] != src[0]:
                uses[src[0]].add(dst[0])
    lines = []
    for layer in sorted(LAYERS, reverse=True):
        lines.append(f"layer {layer}:")
        for e in LAYERS[layer]:
            below = sorted(d.removeprefix("llmrec.") for d in uses.get(e, ()))
            lines.append(f"  {e:<18} -> {', '.join(below) if below else '(nothing of llmrec)'}")
    return "\n".join(lines)


def test_every_module_has_a_layer() -> None:
    missing = sorted(m for m in all_modules() if layer_of(m) is None)
    assert not missing, f"modules without a layer: {missing}; add each to LAYERS in tests/test_layers.py"
    entries = [e for es in LAYERS.values() for e in es]
    assert len(entries) == len(set(entries)), "an entry is listed in two layers"
    stale = [e for e in entries if not any(m == e or m.startswith(e + ".") for m in all_modules())]
    assert not stale, f"LAYERS names modules that do not exist: {stale}"


def test_no_import_runs_up_a_layer() -> None:
    graph = dependency_graph()
    print("\n" + describe(graph))
    bad = upward_imports(graph)
    why = "imports of a higher layer (move the shared code down, or the importer up):\n"
    assert not bad, why + "\n".join(bad)


def test_scorer_inference_imports_no_training_module() -> None:
    """Loading and ranking with a trained scorer (`scorer.inference`) never pulls in the trainer: the modules
    it reaches, at any depth, include none of the training modules."""
    graph = dependency_graph()
    names = ("train", "loss", "validate", "finalize", "artifact", "dataset")
    training = {f"llmrec.scorer.{m}" for m in names}
    assert training <= set(graph), f"a training module was renamed: {sorted(training - set(graph))}"
    seen, todo = set(), ["llmrec.scorer.inference"]
    while todo:
        for dep, _ in graph.get(todo.pop(), []):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    assert "llmrec.scorer.model" in seen  # the walk reaches what inference does import
    assert not seen & training, f"llmrec.scorer.inference reaches {sorted(seen & training)}"


def test_the_graph_sees_function_local_relative_and_importlib_imports(tmp_path: Path) -> None:
    """The reader against hand-written imports of each kind (relative, absolute, in a function, importlib),
    and a planted upward import in the real graph is named with its file, line and layers."""
    pkg = tmp_path / "llmrec"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "data" / "__init__.py").write_text("")
    (pkg / "schema.py").write_text("")
    (pkg / "serve.py").write_text("")
    src = (
        "import importlib\n"
        "from . import sibling\n"
        "from llmrec import schema\n"
        "def f():\n"
        "    from ..serve import x\n"
        "    return importlib.import_module(f'llmrec.serve.{x}')\n"
    )
    (pkg / "data" / "read.py").write_text(src)
    modules = {"llmrec": pkg / "__init__.py", "llmrec.data": pkg / "data" / "__init__.py",
               "llmrec.schema": pkg / "schema.py", "llmrec.serve": pkg / "serve.py",
               "llmrec.data.read": pkg / "data" / "read.py"}
    got = imports_of("llmrec.data.read", pkg / "data" / "read.py", modules)
    assert sorted(got) == [("llmrec.data", 2), ("llmrec.schema", 3), ("llmrec.serve", 5), ("llmrec.serve", 6)]
    graph = dependency_graph()
    before = set(upward_imports(graph))
    graph["llmrec.schema"] = [*graph["llmrec.schema"], ("llmrec.serve.app", 7)]  # a planted upward import
    assert set(upward_imports(graph)) - before == {
        "llmrec/schema.py:7: llmrec.schema (layer 0) imports llmrec.serve.app (layer 4)"
    }


if __name__ == "__main__":
    print(describe(dependency_graph()))
    raise SystemExit(pytest.main([__file__, "-q"]))
