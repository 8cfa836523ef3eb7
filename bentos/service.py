"""The retrieval HTTP service (BentoML): user id -> candidate pins from the live release.

    POST /retrieve   {"user_id": 42, "k": 100, "interests": [3, 7], "exclude_seen": true}
    GET  /healthz    liveness
    GET  /readyz     200 with the loaded release once one is loaded, else 503
    GET  /metadata   the loaded release, limits and config; OpenAPI: GET /docs.json, Swagger UI at /

Run from the repo root: ``BENTOML_HOME=<data_dir>/bentoml bentoml serve bentos.service:RetrievalService``
(``retrieval-service start`` does this; ``make run`` calls it). Config: the defaults of training/config.py,
overridden by the YAML file named in ``RETRIEVAL_CONFIG``; the data dir is ``RETRIEVAL_DATA_DIR`` unless that
file names one. The work is in ``bentos.retriever``; this module is the HTTP surface: strict request
validation (every bad input is a 4xx naming the field), a body-size limit, the ops endpoints, and a
background thread that follows the release registry.
"""

from __future__ import annotations

import logging
import threading
from typing import Annotated, Any

import bentoml
from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import JSONResponse

from bentos.retriever import NotReady, RetrievalError, Retriever
from training.config import Config

log = logging.getLogger("retrieval.service")

CONFIG = Config.load()
SERVE = CONFIG.serve


class RetrieveRequest(BaseModel):
    """Body of POST /retrieve. Types are strict: "7" is not an int, 1.0 is not a user id."""

    model_config = ConfigDict(extra="forbid", strict=True)

    user_id: int = Field(description="The user to retrieve for.")
    k: Annotated[int, Field(ge=1, le=SERVE.max_k, description="Number of pins to return.")] = 100
    interests: Annotated[list[int] | None, Field(max_length=SERVE.max_interests,
                                                 description="Only pins of these interest ids.")] = None
    exclude_seen: bool = Field(True, description="Leave out the pins in the user's recent history.")


class Pin(BaseModel):
    pin_id: int
    score: float
    interest_id: int


class RetrieveResponse(BaseModel):
    user_id: int
    pins: list[Pin]
    model_version: str = Field(description="Model version of the user tower and the collection (always the same).")
    collection: str
    retrieval: str = Field(description="'learned' (user tower + ANN) or 'cold_start' (corpus by decayed engagement).")
    timings_ms: dict[str, float]


def _error(status: int, message: str, field: str | None = None) -> JSONResponse:
    return JSONResponse({"error": message, **({"field": field} if field else {})}, status_code=status)


class RequestGuard:
    """ASGI middleware in front of the API: 415 unless a POST body is JSON (or untyped), 413 for bodies over
    ``max_bytes`` (declared or streamed), before anything parses them."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = _error(413, f"request body is larger than {self.max_bytes} bytes", "body")
        headers = dict(scope.get("headers", []))
        kind = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if scope["method"] == "POST" and kind not in (b"", b"application/json"):
            return await _error(415, f"send the body as JSON with Content-Type: application/json, not "
                                     f"{kind.decode(errors='replace')}", "content-type")(scope, receive, send)
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return await too_big(scope, receive, send)
        seen = 0
        over = False
        answered = False

        async def counting_receive():
            nonlocal seen, over
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    over = True
                    message = {"type": "http.request", "body": b"", "more_body": False}
            return message

        async def guarded_send(message):
            nonlocal answered
            if not over:
                return await send(message)
            if not answered:   # replace the app's answer to the truncated body with the 413
                answered = True
                await too_big(scope, receive, send)

        await self.app(scope, counting_receive, guarded_send)


ops = FastAPI(title="retrieval ops")


@ops.get("/healthz", summary="Liveness")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@ops.get("/readyz", summary="Readiness: 200 with the loaded release, 503 before one is loaded")
def readyz():
    status = bentoml.get_current_service().retriever.status()
    return JSONResponse(status, status_code=200 if status["ready"] else 503)


@ops.get("/metadata", summary="The loaded release, the request limits and the deployment")
def metadata() -> dict[str, Any]:
    svc = bentoml.get_current_service()
    return {**svc.retriever.status(),
            "limits": {"max_k": SERVE.max_k, "max_interests": SERVE.max_interests,
                       "max_body_bytes": SERVE.max_body_bytes},
            "index": {"uri": CONFIG.index.uri or "embedded milvus-lite", "alias": CONFIG.index.alias},
            "online_store": CONFIG.features.online_store, "switches": svc.switches}


class OpsRoutes:
    """ASGI middleware: GET /healthz, /readyz, /metadata go to ``ops`` (BentoML's own /healthz and /readyz
    would otherwise answer first, with an empty body)."""

    PATHS = {"/healthz", "/readyz", "/metadata"}

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "GET" and scope["path"] in self.PATHS:
            return await ops(scope, receive, send)
        return await self.app(scope, receive, send)


@bentoml.asgi_app(ops, path="/")
@bentoml.service(name="retrieval", workers=SERVE.workers, threads=SERVE.threads,
                 traffic={"timeout": 10})
class RetrievalService:
    """User id -> candidate pins from the live release (user tower + Milvus), cold start when unknown."""

    def __init__(self) -> None:
        self.retriever = Retriever(CONFIG)
        self.switches = 0
        self._stop = threading.Event()
        self._poll()
        self._thread = threading.Thread(target=self._follow, name="release-follower", daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        try:
            if self.retriever.refresh():
                self.switches += 1
        except Exception:  # noqa: BLE001 - keep serving the loaded release; retry on the next poll
            log.exception("could not load the live release; still serving %s",
                          self.retriever.current.version if self.retriever.current else "nothing")

    def _follow(self) -> None:
        while not self._stop.wait(SERVE.poll_seconds):
            self._poll()

    def __is_ready__(self) -> bool:
        return self.retriever.current is not None

    @bentoml.on_shutdown
    def shutdown(self) -> None:
        self._stop.set()
        self.retriever.close()

    @bentoml.api(route="/retrieve", input_spec=RetrieveRequest, output_spec=RetrieveResponse)
    def retrieve(self, **request: Any):
        """Candidate pins for a user: learned (user tower + ANN search in the live collection) or cold start."""
        try:
            result = self.retriever.retrieve(request["user_id"], k=request["k"], interests=request["interests"],
                                             exclude_seen=request["exclude_seen"])
        except RetrievalError as e:
            return _error(400, str(e), e.field)
        except NotReady as e:
            return _error(503, str(e))
        return RetrieveResponse(**result)


RetrievalService.add_asgi_middleware(OpsRoutes)
RetrievalService.add_asgi_middleware(RequestGuard, max_bytes=SERVE.max_body_bytes)
