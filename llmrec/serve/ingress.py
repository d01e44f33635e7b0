"""The HTTP deployment `Ingress` (FastAPI): routes, error handlers, the bearer-token check and metrics.

    HTTP --> Ingress --(StateStore: S named UserStateShard actors)--> state get/apply/delete
                    \\--(ModelClient)--> Recommender.recommend (@serve.batch) / .embed (@serve.batch)

The model (`llmrec.serve.recommender.Recommender`) lives in the Ingress replica's own process by default;
with `split_model` it is a deployment of its own behind a handle (one more hop per request). The Ingress
validates everything (4xx `{"error": ...}` for any client mistake, never a 500), embeds feedback text through
the model, writes events through the `StateStore` (fsync'd
log before the answer, so the next /recommend sees them: read-your-writes) and exports the metrics named in
`METRICS` (through `ray.serve.metrics`, so each series also carries its deployment, replica and application;
the users gauge is per state shard, so every Ingress replica exports the same per-shard values: dashboards
take the max per shard, then the sum). A route is one method of `Ingress` plus its response model in
`llmrec.serve.schemas`: error answers are counted under the route template `_route_of` reads from the app's
own routes. `check_health` is Serve's periodic probe. user_config: see `llmrec.serve.recommender`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmrec import __version__, schema
from llmrec.serve import auth
from llmrec.serve import schemas as S
from llmrec.serve.recommender import ModelClient, unwrap_result
from llmrec.serve.run_artifacts import RunArtifacts, embeddings_dir_of
from llmrec.state.errors import StateUnavailable

logger = logging.getLogger(__name__)

METRICS = (
    "llmrec_feedback_events_total",
    "llmrec_feedback_latency_ms",
    "llmrec_recommend_latency_ms",
    "llmrec_state_users",  # tag shard
    "llmrec_errors_total",
)
_LATENCY_BOUNDS_MS = [1, 2, 5, 10, 20, 30, 50, 75, 100, 200, 500, 1000, 5000]


class ClientError(Exception):
    """A client mistake: answered with `status` and `{"error": message}`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _abs_or_none(path: str | os.PathLike | None) -> str | None:
    return None if not path else str(Path(path).expanduser().resolve())


def _eager_annotations(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Resolve string annotations now: Serve re-wraps ingress methods in its own module, where FastAPI
    could not resolve `Request` etc. from the postponed annotations (`from __future__ import annotations`)."""
    fn.__annotations__ = typing.get_type_hints(fn, include_extras=True)
    return fn


# ------------------------------------------------------------- the FastAPI app: errors, auth, metrics
api = FastAPI(
    title="llmrec",
    description='Text-first, feedback-adaptive recommendations. Errors are `{"error": "..."}` with a 4xx.',
    version=__version__,
)


@api.exception_handler(ClientError)
async def _client_error(request: Request, exc: ClientError) -> JSONResponse:
    _count_error(request, exc.status)
    return JSONResponse({"error": exc.message}, status_code=exc.status)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    _count_error(request, 422)
    return JSONResponse({"error": S.format_validation_error(exc)}, status_code=422)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    _count_error(request, exc.status_code)
    return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)


@api.exception_handler(StateUnavailable)
async def _unavailable_error(request: Request, exc: StateUnavailable) -> JSONResponse:
    return unavailable(request, exc)


@api.exception_handler(Exception)
async def _server_error(request: Request, exc: Exception) -> JSONResponse:
    if isinstance(exc, StateUnavailable):  # also when Ray re-raises it as RayTaskError(StateUnavailable)
        return unavailable(request, exc)
    _count_error(request, 500)
    # the path only: it may hold a user id, and the exception text is not logged either (it may too)
    logger.error("internal error on %s: %s", _route_of(request), type(exc).__name__)
    return JSONResponse(
        {"error": f"internal error ({type(exc).__name__}); see the server log"}, status_code=500
    )


def unavailable(request: Request, exc: Exception) -> JSONResponse:
    """503 + Retry-After for a server-side fault (`StateUnavailable`): nothing was acknowledged, retry."""
    _count_error(request, 503)
    retry = max(1, int(round(float(getattr(exc, "retry_after_s", 1.0)))))
    logger.warning("unavailable on %s: %s", _route_of(request), type(exc).__name__)
    return JSONResponse(
        {"error": "the user-state service is temporarily unavailable (nothing was recorded); retry the same "
                  f"request (same event ids) in {retry} s"},
        status_code=503,
        headers={"Retry-After": str(retry)},
    )


class _RequireToken:
    """Every route except /healthz needs `Authorization: Bearer <token>` when a token is configured (reads
    too: /users holds a user's whole history and text feedback). A plain ASGI middleware: Starlette's
    `BaseHTTPMiddleware` (`@app.middleware("http")`) runs every request through extra tasks and streams."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(
        self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]
    ) -> None:
        token = auth.replica_token()  # set by this replica's Ingress (llmrec.serve.auth says why)
        if scope["type"] == "http" and token is not None and not scope["path"].endswith("/healthz"):
            request = Request(scope)
            scheme, _, got = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(got.strip().encode(), token.encode()):
                _count_error(request, 401)
                response = JSONResponse(
                    {"error": "missing or wrong bearer token: send `Authorization: Bearer <token>`"},
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


api.add_middleware(_RequireToken)


_METRICS: dict[str, Any] = {}


def _metrics() -> dict[str, Any]:
    """ray.serve.metrics objects (deployment/replica/application tags added), created lazily inside the
    replica (never at import)."""
    if not _METRICS:
        from ray.serve import metrics as m

        _METRICS.update(
            feedback_events=m.Counter(
                "llmrec_feedback_events_total", "feedback events accepted", tag_keys=("event",)
            ),
            feedback_ms=m.Histogram(
                "llmrec_feedback_latency_ms", "POST /feedback latency (ms)", boundaries=_LATENCY_BOUNDS_MS
            ),
            recommend_ms=m.Histogram(
                "llmrec_recommend_latency_ms", "GET /recommend latency (ms)", boundaries=_LATENCY_BOUNDS_MS
            ),
            users=m.Gauge("llmrec_state_users", "users held by each state shard", tag_keys=("shard",)),
            errors=m.Counter("llmrec_errors_total", "error answers", tag_keys=("route", "status")),
        )
    return _METRICS


def _route_of(request: Request) -> str:
    """The route template of a request ("/users/{user_id}", never the id itself: user ids stay out of logs
    and metric tags), from the app's own routes, so a new route needs no list here; "other" when none
    matches. Works before routing too (the auth middleware counts its 401s)."""
    path = request.url.path
    stack = list(api.routes)
    while stack:
        r = stack.pop(0)
        regex = getattr(r, "path_regex", None)
        if regex is not None and regex.match(path):
            return str(getattr(r, "path", "other"))
        inner = getattr(r, "routes", None) or getattr(getattr(r, "original_router", None), "routes", None)
        stack.extend(inner or [])  # the ingress class's routes sit in an included router
    return "other"


def _set_users_gauge(stats: dict[str, Any]) -> None:
    """One `llmrec_state_users{shard=i}` value per state shard (from StateStore.stats)."""
    for shard in stats["shards"]:
        _metrics()["users"].set(int(shard["n_users"]), tags={"shard": str(shard["shard_id"])})


def _count_error(request: Request, status: int) -> None:
    route = _route_of(request)
    try:
        _metrics()["errors"].inc(tags={"route": route, "status": str(status)})
    except Exception:  # metrics must never turn a 4xx into a 500
        logger.debug("metrics unavailable", exc_info=True)


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=200)
@serve.ingress(api)
class Ingress:
    """The HTTP API (routes below); OpenAPI at /docs."""

    def __init__(
        self,
        recommender: Any,
        run_dir: str,
        n_shards: int = 4,
        model: str | None = None,
        device: str = "cpu",
        auth_token: str | None = None,
        auth_token_file: str | None = None,
        auth_token_env: str | None = None,
        log_user_ids: bool = False,
        max_body_bytes: int = S.MAX_BODY_BYTES,
        state_name: str = "llmrec-state",
        namespace: str = "llmrec",
        log_dir: str | None = None,
        data_dir: str | None = None,
        history_len: int = 200,
        log_retention_s: float | None = None,
        shard_memory_mb: int | None = 256,
        state_url: str | None = None,
        state_url_env: str | None = None,
        artifacts: RunArtifacts | None = None,
    ) -> None:
        """`recommender`: the `Recommender` deployment's handle (`split_model`), or None to load the model
        in this replica (`model`, `device`: the text encoder and its device). `artifacts`: what the app
        serves, resolved once by `build_app` (None: RUN's defaults); the Ingress validates item ids against
        its embeddings. The other args: `build_app`'s of the same names."""
        from llmrec.serve.recommender import Recommender
        from llmrec.state.store import EmbeddingsMeanVectorizer, StateStore

        self.model = (
            ModelClient(handle=recommender) if recommender is not None
            else ModelClient(local=Recommender.func_or_class(run_dir, model, device, artifacts=artifacts))
        )
        self.run_dir = str(run_dir)
        from llmrec.serve.auth import read_token

        # the replica reads a file / variable itself (a Kubernetes Secret mounted in its pod); an explicit
        # token (from `llmrec serve`, which read it from a file or the environment) wins
        self.auth_token = auth_token or (
            read_token(auth_token_file, os.environ, auth_token_env) if (auth_token_file or auth_token_env)
            else None)
        auth.set_replica_token(self.auth_token)
        self.log_user_ids = bool(log_user_ids)
        self.max_body_bytes = int(max_body_bytes)
        self._embeddings_dir = (artifacts.embeddings_dir if artifacts is not None
                                else embeddings_dir_of(self.run_dir, None))
        self._item_ids = self._read_item_ids(self._embeddings_dir)
        log_dir = log_dir or str(Path(self.run_dir) / schema.RUN_EVENTS)
        self.store = StateStore(
            n_shards=n_shards,
            log_dir=log_dir,
            namespace=namespace,
            # the shards' text user vectors live in the space of RUN's own embeddings (a user_config override
            # of embeddings_dir changes the catalog the Ingress validates against, not that space)
            vectorizer_factory=EmbeddingsMeanVectorizer(embeddings_dir_of(self.run_dir, None)),
            name=state_name,
            base_dir=data_dir,
            history_len=history_len,
            log_retention_s=log_retention_s,
            shard_memory_mb=shard_memory_mb,
            # Redis (node loss survives): the URL may hold a password, so the replica reads it from an
            # environment variable filled from a Secret (state_url_env) rather than from the config
            state_url=state_url or (os.environ.get(state_url_env) if state_url_env else None),
        )
        self._default_data_dir = self._data_dir = _abs_or_none(data_dir)
        from llmrec.state.privacy import UserKeyer

        self._keyer = UserKeyer.for_logs(self.store.log_key_sync())  # the shards' keyed ids, in our logs too
        if self.store.joined:  # running shards (a redeploy, another replica) may hold another run's users
            self.store.set_base_sync(self._data_dir)  # a no-op for a shard that already holds this base
        self._m = _metrics()
        logger.info(
            "ingress ready: %d items, %d state shards (users from %s), auth %s",
            len(self._item_ids),
            n_shards,
            self._data_dir or "nowhere: no data folder",
            "on" if self.auth_token else "off",
        )

    @staticmethod
    def _read_item_ids(embeddings_dir: str) -> frozenset[str]:
        from llmrec.embed.artifact import read_item_ids  # either layout, checked against meta.json

        return frozenset(str(x) for x in read_item_ids(embeddings_dir))

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        await self.model.reconfigure(user_config)  # an in-process model first: it resolves the artifacts
        emb = embeddings_dir_of(self.run_dir, user_config)  # no scorer choice here: nothing is read
        if emb != self._embeddings_dir:
            self._item_ids = await asyncio.get_running_loop().run_in_executor(None, self._read_item_ids, emb)
            self._embeddings_dir = emb
        cfg = user_config or {}
        data_dir = _abs_or_none(cfg["data_dir"]) if "data_dir" in cfg else self._default_data_dir
        if data_dir != self._data_dir:
            t0 = time.perf_counter()
            out = await self.store.set_base(data_dir)
            self._data_dir = data_dir
            logger.info(
                "state shards swapped to the users of %s: %d users (%.1fs)",
                data_dir,
                sum(int(o["base"].get("n_users", 0)) for o in out),
                time.perf_counter() - t0,
            )

    async def check_health(self) -> None:
        """Serve's health probe: the ingress is usable when it holds the catalog ids it validates against
        and its in-process model answers a search (`Recommender.check_health`).

        State shards are actors that Ray restarts by themselves, and a split Recommender deployment has its
        own probe; replacing this replica would mend neither, so their outages fail requests (5xx), not
        this probe.
        """
        if not self._item_ids:
            raise RuntimeError("Ingress holds no catalog item ids")
        self.model.check_health()

    # -- helpers
    def _uid(self, user_id: str) -> str:
        return user_id if self.log_user_ids else self._keyer.log_id(user_id)

    async def _read_json(self, request: Request) -> Any:
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise ClientError(400, f"bad Content-Length header {declared[:20]!r}")
            if int(declared) > self.max_body_bytes:
                raise ClientError(
                    413,
                    f"body of {declared} bytes exceeds the {self.max_body_bytes}-byte limit; "
                    f"send at most {S.MAX_EVENTS} events per request",
                )
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise ClientError(
                    413,
                    f"body exceeds the {self.max_body_bytes}-byte limit; send at most "
                    f"{S.MAX_EVENTS} events per request",
                )
            chunks.append(chunk)
        body = b"".join(chunks)
        if not body.strip():
            raise ClientError(
                400, 'empty body: send a JSON object like {"user_id": "u1", "item_id": "i1", "event": "like"}'
            )
        try:
            return json.loads(body)
        except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ClientError(400, f"body is not valid UTF-8 JSON: {str(e)[:120]}") from None

    @staticmethod
    def _check_user_id(user_id: str) -> None:
        """The same rule as a /feedback body's user_id: an id /feedback refuses is refused everywhere."""
        if not user_id or len(user_id) > S.MAX_ID_CHARS or not S.printable(user_id):
            raise ClientError(
                422,
                f"user_id must be 1..{S.MAX_ID_CHARS} non-blank characters without control characters, got "
                f"{user_id[:40]!r}",
            )

    # -- routes
    @api.post(
        "/feedback",
        response_model=S.FeedbackResponse,
        responses={
            400: {"model": S.ErrorResponse},
            401: {"model": S.ErrorResponse},
            413: {"model": S.ErrorResponse},
            422: {"model": S.ErrorResponse},
        },
    )
    @_eager_annotations
    async def feedback(self, request: Request) -> dict[str, Any]:
        """Record `{"user_id", "item_id", "event", "value"?, "text"?, "ts"?}` or `{"events": [...]}`."""
        t0 = time.perf_counter()
        try:
            events = S.parse_feedback(await self._read_json(request))
        except ValueError as e:
            raise ClientError(422, str(e)) from None
        unknown = sorted(
            {e.item_id for e in events if e.item_id is not None and e.item_id not in self._item_ids}
        )
        if unknown:
            shown = ", ".join(repr(u[:40]) for u in unknown[:5])
            raise ClientError(
                422,
                f"unknown item_id(s) {shown}{' ...' if len(unknown) > 5 else ''}; "
                f"ids must come from the catalog ({len(self._item_ids)} items)",
            )
        texts = [e.text for e in events if e.text is not None]
        encoded = await asyncio.gather(*[self.model.embed(t) for t in texts]) if texts else []
        vecs = iter([unwrap_result(v, "text encoding") for v in encoded])
        from llmrec.state.errors import InvalidEvent

        now = time.time()
        typed = []  # the one validation into typed Events (the state's rules, before anything is written)
        for e in events:
            try:
                typed.append(e.to_event(text_vec=next(vecs) if e.text is not None else None, now=now))
            except InvalidEvent as err:
                raise ClientError(422, f"invalid event: {err}") from None
        try:
            results = await self.store.apply(typed)
        except InvalidEvent as err:  # the shard re-validates; its refusals are still client errors
            raise ClientError(422, f"invalid event: {str(err).splitlines()[-1][:300]}") from None
        for e in events:
            self._m["feedback_events"].inc(tags={"event": e.event})
        dt = (time.perf_counter() - t0) * 1e3
        self._m["feedback_ms"].observe(dt)
        logger.debug("feedback: %d events for %s in %.1f ms", len(events), self._uid(events[-1].user_id), dt)
        return {
            "ok": True,
            "state_version": int(results[-1]["state_version"]),
            "n_events": len(results),
            "duplicates": sum(bool(r.get("duplicate")) for r in results),
            "deleted": sum(bool(r.get("deleted")) for r in results),
            "event_ids": [str(r["event_id"]) for r in results],
        }

    @api.get("/recommend", response_model=S.RecommendResponse, responses={422: {"model": S.ErrorResponse}})
    @_eager_annotations
    async def recommend(
        self,
        user_id: str = Query(min_length=1, max_length=S.MAX_ID_CHARS),
        k: int = Query(10, ge=1, le=S.MAX_K),
        q: str | None = Query(None, min_length=1, max_length=S.MAX_QUERY_CHARS),
        exclude_seen: bool = True,
    ) -> dict[str, Any]:
        """Top-k items for a user (new users: popularity prior), optionally steered by free text `q`."""
        t0 = time.perf_counter()
        self._check_user_id(user_id)
        if q is not None and not S.printable(q):
            raise ClientError(422, "q must contain non-blank text without control characters")
        state = await self.store.get(user_id)
        res = unwrap_result(await self.model.recommend(
            {"user_id": user_id, "state": state, "k": k, "q": q, "exclude_seen": exclude_seen}
        ), "ranking")
        dt = (time.perf_counter() - t0) * 1e3
        self._m["recommend_ms"].observe(dt)
        logger.debug("recommend: %s k=%d in %.1f ms", self._uid(user_id), k, dt)
        return {
            "user_id": user_id,
            "items": res["items"],
            "state_version": int(state.version) if state is not None else 0,
            "model_version": res["model_version"],
        }

    @api.get("/users/{user_id:path}", responses={404: {"model": S.ErrorResponse}})
    @_eager_annotations
    async def get_user(self, user_id: str) -> dict[str, Any]:
        """The user's state summary (history, seen, negatives, text feedback, version); users of the run's
        interactions are known from the start (their last events, counted in n_events/version). Ids with
        `/` work here (`/users/a%2Fb`); ids that URL normalisation changes (`.`, `..`) need
        `GET /users?user_id=`.
        """
        return await self._get_user(user_id)

    @api.get("/users", responses={404: {"model": S.ErrorResponse}})
    @_eager_annotations
    async def get_user_q(self, user_id: str = Query(min_length=1, max_length=S.MAX_ID_CHARS)
                         ) -> dict[str, Any]:
        """`GET /users/{user_id}` with the id as a query parameter (any id, also `.` or `..`)."""
        return await self._get_user(user_id)

    @api.delete("/users/{user_id:path}", responses={401: {"model": S.ErrorResponse}})
    @_eager_annotations
    async def delete_user(self, user_id: str) -> dict[str, Any]:
        """Forget a user: state, logged events, and for good its history in the run's interactions; events of
        the user stamped before the delete (retries, requests in flight) are refused afterwards."""
        return await self._delete_user(user_id)

    @api.delete("/users", responses={401: {"model": S.ErrorResponse}})
    @_eager_annotations
    async def delete_user_q(self, user_id: str = Query(min_length=1, max_length=S.MAX_ID_CHARS)
                            ) -> dict[str, Any]:
        """`DELETE /users/{user_id}` with the id as a query parameter (any id, also `.` or `..`)."""
        return await self._delete_user(user_id)

    async def _get_user(self, user_id: str) -> dict[str, Any]:
        self._check_user_id(user_id)
        state = await self.store.get(user_id)
        if state is None:
            raise ClientError(
                404, "unknown user: not in the run's interactions and no feedback recorded for this user_id"
            )
        return state.to_json()  # the vectors stay server-side (the ranker uses them)

    async def _delete_user(self, user_id: str) -> dict[str, Any]:
        self._check_user_id(user_id)
        deleted = await self.store.delete(user_id)
        logger.info("deleted user %s (existed: %s)", self._uid(user_id), deleted)
        return {"ok": True, "deleted": bool(deleted)}

    @api.get("/healthz")
    @_eager_annotations
    async def healthz(self) -> dict[str, Any]:
        """Liveness of the model deployment and every state shard; also refreshes `llmrec_state_users`."""
        info = await self.model.info()
        stats = await self.store.stats()
        _set_users_gauge(stats)
        return {
            "ok": True,
            "model_version": info["model_version"],
            "n_items": info["n_items"],
            "n_users": int(stats["n_users"]),
            "n_shards": int(stats["n_shards"]),
        }

    @api.get("/admin/model", responses={401: {"model": S.ErrorResponse}})
    @_eager_annotations
    async def admin_model(self, request: Request) -> dict[str, Any]:
        """Which scorer serves and why, and the learning loop's model registry (bearer token when auth is
        on)."""
        from llmrec.learn import read_registry

        info = await self.model.info()
        try:
            registry = read_registry(self.run_dir)
        except ValueError as e:
            raise ClientError(409, str(e)) from None
        return {"serving": info, "registry": registry}

    @api.post("/admin/model", responses={400: {"model": S.ErrorResponse}, 401: {"model": S.ErrorResponse}})
    @_eager_annotations
    async def set_model(self, request: Request) -> dict[str, Any]:
        """`{"rollback": true}` serves the previous model again; `{"scorer_dir": DIR, "why": TEXT}` serves DIR
        (a `llmrec train` folder). The replicas swap it in within about a second (bearer token when auth is
        on)."""
        from llmrec.artifacts import ArtifactError
        from llmrec.learn import rollback, set_current

        body = await self._read_json(request)
        if not isinstance(body, dict) or not (
            body.get("rollback") is True or isinstance(body.get("scorer_dir"), str)
        ):
            raise ClientError(422, 'send {"rollback": true} or {"scorer_dir": "PATH", "why": "..."}')
        try:
            if body.get("rollback") is True:
                reg = rollback(self.run_dir, str(body.get("why") or "rollback over HTTP"))
            else:
                target = (Path(self.run_dir) / body["scorer_dir"]).resolve()
                if not target.is_relative_to(Path(self.run_dir).resolve()):  # only the run's own models
                    raise ClientError(422, f"scorer_dir must lie inside the run folder {self.run_dir}, got "
                                           f"{body['scorer_dir'][:200]!r}")
                reg = set_current(self.run_dir, target, str(body.get("why") or "set over HTTP"))
        except (ValueError, ArtifactError, FileNotFoundError) as e:
            raise ClientError(422, str(e)) from None
        return {"ok": True, "registry": reg}

    @api.get("/admin/stats", responses={401: {"model": S.ErrorResponse}})
    @_eager_annotations
    async def admin_stats(self, request: Request) -> dict[str, Any]:
        """Model info and per-shard state counts (bearer token when auth is on)."""
        info = await self.model.info()
        stats = await self.store.stats()
        _set_users_gauge(stats)
        return {"model": info, "state": stats, "pid": os.getpid()}
