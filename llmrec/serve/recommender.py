"""The model `Recommender`: retrieval, re-ranking and text encoding for one run folder.

It holds a `RecommendCore` (catalog + ItemIndex + optional Scorer) and the BERT `TextEncoder` (for `q`
queries and text feedback). By default every Ingress replica holds one in its own process (`ModelClient`:
no hop between the HTTP request and its ranking); with `build_app(split_model=True)` it is a deployment of
its own, called through its handle, whose replicas scale (and may take GPUs) apart from the HTTP ones.
`reconfigure(user_config)` builds a new core off the event loop and swaps it in one assignment, so
requests keep being served by the old model until the new one is ready. Its batch handlers run the
ranking and the encoder in a worker thread (the event loop keeps answering other requests) and answer each
request of a batch alone when the batch fails (`{"error": ...}` for the failing ones; `unwrap_result` turns
that into `RequestFailed` in the caller). `check_health` is Serve's periodic probe (every 10 s): a replica
whose index cannot answer a search (e.g. a device error after start) is replaced instead of being sent
requests.

user_config keys (the Ingress gets the same dict; all optional): `embeddings_dir`, `index_dir`,
`scorer_dir` (null = no scorer; default RUN/scorer when it holds a meta.json), `model_version` (default: a
hash of the artifacts' created_at), `rank` (RankConfig fields), `data_dir` (Ingress: the prepared data folder
whose users the state shards start from; a new value hot-swaps every shard to that run's users, null = none;
absent = the build_app default). Changing the embedding model needs a redeploy (the state shards' user
vectors live in that space); a new index, scorer or data folder does not.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ray import serve

from llmrec.serve.run_artifacts import (
    RunArtifacts,
    load_catalog_from,
    load_text_encoder,
    registry_mtime_ns,
    resolve_artifacts,
)

if TYPE_CHECKING:
    from llmrec.serve.recommend_core import RecommendCore

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Served:
    """The model one replica serves, swapped in one assignment."""

    core: RecommendCore
    model_version: str
    arts: RunArtifacts


@serve.deployment(name="Recommender", ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64)
class Recommender:
    """Retrieval + re-ranking + text encoding for one run folder (see the module docstring)."""

    def __init__(self, run_dir: str, model: str | None = None, device: str = "cpu", *,
                 artifacts: RunArtifacts | None = None) -> None:
        """Args:
            run_dir: the run folder (titles, popularity, the model registry).
            model: the text encoder (default: the embeddings' model); device: "cpu" | "cuda[:i]".
            artifacts: what to serve, resolved once for the app by `build_app` (None: RUN's defaults,
                resolved here, for use without build_app). Resolved again here only when the model registry
                changed since (a replica that Serve starts long after the deploy).
        """
        self._run_dir = str(run_dir)
        self._model_arg = model
        self._device = device
        self._encoder: Any = None
        self._state: _Served | None = None
        self._load_lock = asyncio.Lock()
        arts = artifacts if artifacts is not None else resolve_artifacts(self._run_dir, None)
        self._user_config: dict[str, Any] = dict(arts.user_config)
        moved = registry_mtime_ns(self._run_dir) != arts.registry_mtime_ns
        if moved and "scorer_dir" not in arts.user_config:
            logger.info("model registry changed since the app was built: resolving the artifacts again")
            arts = resolve_artifacts(self._run_dir, arts.user_config)
        self._registry_mtime = arts.registry_mtime_ns
        self._checked = time.monotonic()
        self._swap(self._build(arts))

    def _watch_registry(self) -> None:
        """At most once a second: when the learning loop changed the model registry (and user_config does not
        pin a scorer), rebuild through the reconfigure path in the background; requests keep the old model
        until the new one is ready."""
        now = time.monotonic()
        if now - self._checked < 1.0 or "scorer_dir" in self._user_config:
            return
        self._checked = now
        m = registry_mtime_ns(self._run_dir)
        if m != self._registry_mtime:
            self._registry_mtime = m
            logger.info("model registry changed: reloading")
            asyncio.get_running_loop().create_task(self.reconfigure(self._user_config, force=True))

    # -- model loading / swapping
    def _build(self, arts: RunArtifacts) -> _Served:
        """Load catalog, index, scorer (and the encoder, once): each artifact's meta.json is read once."""
        from llmrec.index.item_index import ItemIndex
        from llmrec.serve.recommend_core import RankConfig, RecommendCore

        t0 = time.perf_counter()
        catalog, embed_meta = load_catalog_from(arts.embeddings_dir, self._run_dir)
        index = ItemIndex.load(arts.index_dir, expect_embed_meta=embed_meta, device=self._device)
        scorer = None
        if arts.scorer_dir:
            from llmrec.scorer.inference import Scorer

            scorer = Scorer.load(arts.scorer_dir, device=self._device)
        core = RecommendCore(catalog, index, scorer=scorer, config=RankConfig(**arts.rank))
        if self._encoder is None:
            self._encoder = load_text_encoder(self._model_arg, embed_meta, self._device)
        if self._encoder.dim != catalog.dim:
            raise ValueError(
                f"text encoder {self._encoder.model_name!r} is {self._encoder.dim}-d but the embeddings are "
                f"{catalog.dim}-d ({embed_meta.get('model_name')!r}); serve with the encoder that built them"
            )
        created = [m.get("created_at") for m in (embed_meta, index.meta or {}, scorer.meta if scorer else {})]
        version = arts.model_version or hashlib.sha256(json.dumps(created).encode()).hexdigest()[:10]
        logger.info(
            "recommender ready: %d items, index %s, scorer %s, version %s (%.1fs)",
            catalog.n_items,
            index.kind,
            "yes" if scorer is not None else "no",
            version,
            time.perf_counter() - t0,
        )
        return _Served(core=core, model_version=str(version), arts=arts)

    def _swap(self, state: _Served) -> None:
        self._state = state  # one assignment: requests see the old or the new model, never a mix

    async def reconfigure(self, user_config: dict[str, Any], force: bool = False) -> None:
        """Serve's user_config hook (also at replica start): the artifacts resolved for this very user_config
        are kept; another one is resolved here, and only new folders are loaded again (off the event loop)."""
        self._user_config = dict(user_config or {})
        old = self._state
        if old is not None and not force and self._user_config == dict(old.arts.user_config):
            return  # what build_app (or the last reconfigure) resolved from this user_config
        arts = resolve_artifacts(self._run_dir, user_config)
        if old is not None and arts == old.arts and not force:
            return
        if old is not None and arts.same_files(old.arts):
            # same artifacts, new ranking knobs or version label: no reload
            from llmrec.serve.recommend_core import RankConfig, RecommendCore

            c = old.core
            core = RecommendCore(c.catalog, c.index, scorer=c.scorer, config=RankConfig(**arts.rank))
            version = str(arts.model_version or old.model_version)
            self._swap(_Served(core=core, model_version=version, arts=arts))
            logger.info("reconfigured ranking (%s), version %s", arts.rank, self._state.model_version)
            return
        async with self._load_lock:
            new = await asyncio.get_running_loop().run_in_executor(None, self._build, arts)
            self._swap(new)

    def check_health(self) -> None:
        """Serve's health probe: one top-1 search for the first catalog vector on the serving index.

        Raises:
            RuntimeError: no model is loaded (Serve then restarts this replica); an index or device error from
                the search propagates the same way.
        """
        st = self._state
        if st is None or self._encoder is None:
            raise RuntimeError("Recommender has no model loaded")
        st.core.index.search(st.core.catalog.vectors[:1], k=1)

    # -- requests
    def info(self) -> dict[str, Any]:
        self._watch_registry()
        st = self._state
        cat = st.core.catalog
        return {
            "scorer_dir": st.arts.scorer_dir,
            "scorer_why": st.arts.scorer_why,
            "model_version": st.model_version,
            "n_items": cat.n_items,
            "dim": cat.dim,
            "scorer": st.core.scorer is not None,
            "index_kind": getattr(st.core.index, "kind", "?"),
            "embeddings_dir": st.arts.embeddings_dir,
        }

    def item_ids(self) -> list[str]:
        return [str(i) for i in self._state.core.catalog.item_ids]

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def embed(self, texts: list[str]) -> list[list[float] | dict[str, str]]:
        """Batched BERT encoding: one text in, its (D,) unit vector out (or {"error": ...} for that text
        alone when it cannot be encoded: one bad request never fails the others of its batch)."""
        encoder = self._encoder
        return await asyncio.get_running_loop().run_in_executor(
            None, _isolated, lambda batch: [v.tolist() for v in encoder.encode(list(batch), batch_size=32)],
            texts, "embed")

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def recommend(self, reqs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Batched ranking. A request: {user_id, state (StateSummary|None), k, q (str|None), exclude_seen}.
        Returns {items, model_version} per request, or {"error": ...} for a request that failed alone."""
        self._watch_registry()  # a model the learning loop made current since the last batch swaps in first
        st = self._state  # one model for the whole batch, also when it is re-ranked request by request
        return await asyncio.get_running_loop().run_in_executor(
            None, _isolated, lambda batch: self._rank(st, batch), reqs, "recommend")

    def _rank(self, st: _Served, reqs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from llmrec.serve.user_view import Query, UserView

        core = st.core
        q_texts = [r["q"] for r in reqs if r.get("q")]
        q_vecs = iter(self._encoder.encode(q_texts, batch_size=32) if q_texts else [])
        queries = [Query(r["q"], next(q_vecs)) if r.get("q") else None for r in reqs]
        users = [UserView.from_state(r.get("state"), r["user_id"]) for r in reqs]
        out = core.recommend(
            users,
            k=[int(r["k"]) for r in reqs],
            queries=queries,
            exclude_seen=[bool(r.get("exclude_seen", True)) for r in reqs],
        )
        return [{"items": items, "model_version": st.model_version} for items in out]


def _isolated(fn: Callable[[list[Any]], list[Any]], batch: list[Any], what: str) -> list[Any]:
    """`fn(batch)`; if it raises, `fn` on each item alone, so only the failing items get an error result
    ({"error": exception type}) and the rest of the batch is answered normally."""
    try:
        return fn(batch)
    except Exception as e:  # noqa: BLE001 - decided per item below
        if len(batch) == 1:
            logger.error("%s failed: %s", what, type(e).__name__)
            return [{"error": type(e).__name__}]
    out: list[Any] = []
    for item in batch:
        try:
            out.extend(fn([item]))
        except Exception as e:  # noqa: BLE001 - reported to this item's caller only
            logger.error("%s failed for one request of a batch of %d: %s", what, len(batch), type(e).__name__)
            out.append({"error": type(e).__name__})
    return out


class ModelClient:
    """How the Ingress reaches the model: a `Recommender` in its own process (`local`, the default app) or
    the `Recommender` deployment's handle (`handle`, `build_app(split_model=True)`); the same awaitable
    calls either way.

    Raises:
        ValueError: not exactly one of `local` and `handle` given.
    """

    def __init__(self, local: Any = None, handle: Any = None) -> None:
        if (local is None) == (handle is None):
            raise ValueError("ModelClient needs exactly one of local (a Recommender) and handle (a "
                             "DeploymentHandle)")
        self.local, self.handle = local, handle

    async def recommend(self, req: dict[str, Any]) -> dict[str, Any]:
        """`Recommender.recommend` for one request (batched with the others in flight)."""
        if self.local is not None:
            return await self.local.recommend(req)
        return await self.handle.recommend.remote(req)

    async def embed(self, text: str) -> list[float] | dict[str, str]:
        if self.local is not None:
            return await self.local.embed(text)
        return await self.handle.embed.remote(text)

    async def info(self) -> dict[str, Any]:
        if self.local is not None:
            return self.local.info()
        return await self.handle.info.remote()

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """The in-process model takes the Ingress's user_config; Serve sends a split deployment its own."""
        if self.local is not None:
            await self.local.reconfigure(user_config)

    def check_health(self) -> None:
        """The in-process model's probe (a split deployment has its own, which Serve calls)."""
        if self.local is not None:
            self.local.check_health()


class RequestFailed(RuntimeError):
    """A request the model deployment could not answer (its batch mates were answered)."""


def unwrap_result(res: Any, what: str) -> Any:
    if isinstance(res, dict) and "error" in res and len(res) == 1:
        raise RequestFailed(f"{what} failed ({res['error']}); see the server log")
    return res

