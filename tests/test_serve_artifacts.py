"""Run artifacts are resolved once per app (`build_app`) and handed to both deployments as one `RunArtifacts`.

Counted with a spy on `Path.read_text` (every meta.json and the run's eval/metrics.json are read through it),
on the tiny run of test_serve_app, without Serve: the deployments' classes are built from the arguments
`build_app` bound, then given the user_config as Serve does when a replica starts. Before this contract, one
app with one replica per deployment read eval/metrics.json four times (each deployment resolved in its
constructor and again in reconfigure), and the Recommender read embeddings/meta.json and index/meta.json twice
each: {metrics 2, embeddings 2, index 2} in the Recommender alone, measured on the same run.
"""

from __future__ import annotations

import asyncio
import collections
import json
import types
from pathlib import Path

import pytest

from llmrec import schema

USER_CONFIG = {"rank": {"pop_weight": 0.01}}


def tiny_run_with_eval(run: Path, model_dir: str) -> Path:
    """The tiny serving run plus RUN/scorer/meta.json and an evaluation where the text fallback wins, so the
    scorer choice reads eval/metrics.json (and serves no scorer: no trained weights are needed)."""
    from test_serve_app import build_tiny_run

    from llmrec.artifacts import write_meta

    build_tiny_run(run, model_dir)
    write_meta(run / schema.RUN_SCORER, "train")
    (run / schema.RUN_EVAL).mkdir()
    models = {"llmrec": {"ndcg@10": 0.01}, "served_text": {"ndcg@10": 0.02}}
    (run / schema.RUN_EVAL / "metrics.json").write_text(json.dumps({"loo": {"models": models}}))
    return run


def count_reads(monkeypatch: pytest.MonkeyPatch, run: Path) -> collections.Counter:
    """{path relative to run: times read} for every meta.json / metrics.json read from now on."""
    reads: collections.Counter = collections.Counter()
    read_text = Path.read_text

    def spy(self: Path, *a, **kw) -> str:
        if self.name in (schema.META_FILE, "metrics.json"):
            reads[self.relative_to(run).as_posix() if self.is_relative_to(run) else str(self)] += 1
        return read_text(self, *a, **kw)

    monkeypatch.setattr(Path, "read_text", spy)
    return reads


def test_build_app_resolves_once_and_both_deployments_get_that_value(
    tiny_model_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llmrec.serve.app import build_app
    from llmrec.serve.ingress import Ingress
    from llmrec.serve.recommender import ModelClient, Recommender
    from llmrec.serve.run_artifacts import RunArtifacts, resolve_artifacts

    run = tiny_run_with_eval(tmp_path / "run", tiny_model_dir)
    reads = count_reads(monkeypatch, run)
    default = build_app({"run_dir": str(run), "user_config": USER_CONFIG})._bound_deployment
    assert default.init_args[0] is None  # no Recommender deployment: each Ingress replica loads the model
    assert isinstance(default.init_kwargs["artifacts"], RunArtifacts)
    reads.clear()
    app = build_app({"run_dir": str(run), "user_config": USER_CONFIG, "split_model": True})
    assert reads == {"eval/metrics.json": 1}  # the scorer choice, made once for the app
    ingress = app._bound_deployment
    recommender = ingress.init_args[0]._bound_deployment
    arts = recommender.init_kwargs["artifacts"]
    assert isinstance(arts, RunArtifacts) and ingress.init_kwargs["artifacts"] is arts  # one value, both
    assert arts == resolve_artifacts(run, USER_CONFIG)
    assert arts.scorer_dir is None and "0.0100 <= served text fallback 0.0200" in arts.scorer_why
    reads.clear()

    # a Recommender replica as Serve starts it: its constructor, then reconfigure with the same user_config
    rec = Recommender.func_or_class(*recommender.init_args, **recommender.init_kwargs)
    asyncio.run(rec.reconfigure(recommender.user_config))
    assert reads == {"embeddings/meta.json": 1, "index/meta.json": 1}  # each meta once, no re-resolution
    assert rec.info()["scorer_why"] == arts.scorer_why and rec.info()["n_items"] == 19

    # the Ingress's reconfigure needs the embeddings folder only, and passes the user_config to its
    # in-process model (here the Recommender above): with the same user_config neither reads anything
    me = types.SimpleNamespace(run_dir=str(run), _embeddings_dir=arts.embeddings_dir, _default_data_dir=None,
                               _data_dir=None, model=ModelClient(local=rec))
    asyncio.run(Ingress.func_or_class.reconfigure(me, dict(USER_CONFIG)))
    assert reads == {"embeddings/meta.json": 1, "index/meta.json": 1}

    # a new user_config (a `serve deploy` of new ranking knobs) is resolved in the replica; same folders: no
    # reload, only the knobs change
    version = rec.info()["model_version"]
    asyncio.run(rec.reconfigure({"rank": {"pop_weight": 0.5}}))
    assert reads == {"embeddings/meta.json": 1, "index/meta.json": 1, "eval/metrics.json": 1}
    assert rec._state.core.config.pop_weight == 0.5 and rec.info()["model_version"] == version


def test_a_replica_started_after_the_registry_moved_resolves_again(
    tiny_model_dir: str, tmp_path: Path
) -> None:
    """A replica Serve starts after the learning loop changed the model registry must not serve the scorer
    choice made at build time: it resolves again and loads the registry's scorer (here a folder without
    weights, so loading it fails and names it); a user_config that pins the scorer keeps the pinned one."""
    from llmrec.artifacts import ArtifactError, write_meta
    from llmrec.learn import set_current
    from llmrec.serve.recommender import Recommender
    from llmrec.serve.run_artifacts import resolve_artifacts

    run = tiny_run_with_eval(tmp_path / "run", tiny_model_dir)
    arts = resolve_artifacts(run, USER_CONFIG)
    pinned = resolve_artifacts(run, {**USER_CONFIG, "scorer_dir": None})
    assert arts.registry_mtime_ns is None and arts.scorer_dir is None
    candidate = run / "scorers" / "s1"
    write_meta(candidate, "train")
    set_current(run, candidate, "test: a newer model")
    with pytest.raises(ArtifactError, match=rf"{candidate}/model.pt is missing"):
        Recommender.func_or_class(str(run), artifacts=arts)
    assert Recommender.func_or_class(str(run), artifacts=pinned).info()["scorer"] is False
