from __future__ import annotations

import subprocess
import sys

import llmrec
from llmrec import cli

PUBLIC_API = [
    "__version__",
    "prepare",
    "read_items",
    "read_interactions",
    "TextEncoder",
    "EmbedConfig",
    "embed_catalog",
    "load_embeddings",
    "ItemIndex",
    "IndexConfig",
    "build_index",
    "TrainConfig",
    "fit_scorer",
    "Scorer",
    "evaluate",
    "StateStore",
    "ServeConfig",
    "build_app",
]


def test_all_names_resolve():
    assert llmrec.__all__ == PUBLIC_API  # changing the public API is a deliberate edit of this list
    assert set(llmrec.__all__) == {"__version__", *llmrec._EXPORTS}  # every name has a lazy home
    for name in llmrec._EXPORTS:
        obj = getattr(llmrec, name)
        assert callable(obj), name


def test_stage_configs_are_exported():
    """Each stage's options have one home, llmrec.config, re-exported at the top."""
    import llmrec.config

    for name in ("EmbedConfig", "IndexConfig", "ServeConfig", "TrainConfig"):
        assert name in llmrec.__all__ and getattr(llmrec, name) is getattr(llmrec.config, name)


def _heavy_modules_after(code: str, heavy: tuple[str, ...]) -> str:
    """Run `code` in a fresh interpreter; the printed sorted list of the `heavy` packages it imported."""
    probe = f"import sys\n{code}\nprint(sorted({{m.split('.')[0] for m in sys.modules}} & set({heavy!r})))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_import_is_light():
    # no torch / ray at `import llmrec` (no side effects, fast CLI start)
    code = "import llmrec, llmrec.cli; llmrec.cli.build_parser()"
    assert _heavy_modules_after(code, ("torch", "ray")) == "[]"


def test_training_data_tasks_import_no_torch() -> None:
    """The Ray Data tasks that build training samples run `llmrec.scorer.dataset` functions: a fresh worker
    imports that module, and torch would add ~2 s to each new worker (there was such an import chain, through
    `scorer.data` -> `scorer.model` for one dict)."""
    assert _heavy_modules_after("import llmrec.scorer.dataset", ("torch",)) == "[]"


def test_every_command_has_help():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert sorted(sub.choices) == sorted(cli.COMMANDS)
    for name in cli.COMMANDS:
        assert sub.choices[name].description, name


def test_user_error_is_one_line_exit_2(tmp_path, capsys):
    rc = cli.main(["index", "--embeddings", str(tmp_path / "nope"), "--out", str(tmp_path / "idx")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "llmrec index: error:" in err and "Traceback" not in err
