"""The retrieval HTTP service (BentoML): user id -> candidate pins from the live release.

    POST /retrieve   {"user_id": 42, "k": 100, "interests": [3, 7], "exclude_seen": true}
    POST /events     {"events": [{"event_id": "e1", "user_id": 42, "pin_id": 7, "event_type": "save",
                                  "event_timestamp": "2026-12-07T10:00:00Z", "surface": "homefeed"}]}
                     engagements in real time (bentos/ingest.py)
    GET  /healthz    liveness (always answers, also under load); GET /livez the same
    GET  /readyz     200 with the loaded release when it and the online store answer, else 503 with the reason
    GET  /metadata   the loaded release, limits and config;   GET /metrics   Prometheus, bounded labels
    OpenAPI: GET /docs.json, Swagger UI at /

Run from the repo root: ``BENTOML_HOME=<data_dir>/bentoml bentoml serve bentos.service:RetrievalService``
(``retrieval-service start`` does this; ``make run`` calls it). Config: the defaults of training/config.py,
overridden by the YAML file named in ``RETRIEVAL_CONFIG``; the data dir is ``RETRIEVAL_DATA_DIR`` unless that
file names one. The work is in ``bentos.retriever``; this module is the HTTP surface:

- every error has one body shape, ``{"error": str, "field": str | null, "details": [...] | null}``: 400 for a bad
  request (naming the field), 408 for a body that arrives too slowly, 413 / 415 for size and type, 503 with
  ``Retry-After`` when no release is live, a store fails or the service sheds load;
- a bounded number of requests in flight (``serve.max_in_flight``): past it a request is refused at once with
  503, so latency stays bounded while ``/healthz`` and ``/readyz`` keep answering;
- client errors are logged as one INFO line; repeated faults (a broken registry, a failing store) are logged
  once and then at most once a minute;
- a background thread follows the release registry.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Annotated, Any, Literal

import bentoml
from fastapi import FastAPI
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field
from starlette.responses import JSONResponse, Response

from bentos import admission, http_limits
from bentos.admission import Admission
from bentos.ingest import IngestError, Ingestor, PushFailed
from bentos.observability import METRICS, RateLimitedLog, quiet_client_errors
from bentos.retriever import NotReady, RetrievalError, Retriever, StoreUnavailable
from training import __version__
from training.config import Config
from training.features.realtime import LogUnavailable

log = logging.getLogger("retrieval.service")
fault_log = RateLimitedLog(log)

CONFIG = Config.load()
SERVE = CONFIG.serve
INT64 = 2**63
http_limits.install(SERVE.max_header_bytes, SERVE.header_seconds, SERVE.shed_delay_seconds,
                    SERVE.shed_rate)   # before uvicorn starts
GATE = admission.install(SERVE.max_in_flight, SERVE.latency_target_seconds, SERVE.min_in_flight)
"""This worker's admission: the ASGI guard admits through it, the HTTP protocol sheds early by it."""


class RetrieveRequest(BaseModel):
    """Body of POST /retrieve. Types are strict: "7" is not an int, 1.0 is not a user id."""

    model_config = ConfigDict(extra="forbid", strict=True)

    user_id: Annotated[int, Field(ge=-INT64, le=INT64 - 1, description="The user to retrieve for (int64).")]
    k: Annotated[int, Field(ge=1, le=SERVE.max_k, description="Number of pins to return.")] = 100
    interests: Annotated[list[Annotated[int, Field(ge=0, le=INT64 - 1)]], Field(
        max_length=SERVE.max_interests,
        description="Only pins of these interest ids; empty = every interest. An id the live release does not know "
                    "is a 400 (the ids: GET /metadata).")] = []
    exclude_seen: bool = Field(True, description="Leave out the pins in the user's recent history.")
    mode: Literal["single", "multi", "conditional"] | None = Field(
        None, description="single: one user vector; multi: one per interest cluster of the history, merged "
                          "round-robin; conditional: one per interest (the requested ones, else the user's top "
                          "interests), each searched within it. null: the live release's default (/metadata).")


class Pin(BaseModel):
    pin_id: int
    score: float
    interest_id: int
    source: str = Field(description="What found the pin: 'embedding:<i>', 'interest:<id>' or 'popular'.")


class RetrieveResponse(BaseModel):
    user_id: int
    pins: list[Pin]
    model_version: str = Field(description="Model version of the user tower and the collection (always the same).")
    collection: str
    retrieval: str = Field(description="'learned' (user tower + ANN) or 'cold_start' (corpus by decayed engagement).")
    mode: str | None = Field(description="The retrieval mode of a learned answer.")
    timings_ms: dict[str, float]


INGEST = CONFIG.ingest


class Event(BaseModel):
    """One engagement event, as the raw events files hold it, plus the id that makes a retry harmless."""

    model_config = ConfigDict(extra="forbid", strict=True)

    event_id: Annotated[str, Field(min_length=1, max_length=128, description="Unique id of the event: a retried "
                                   "event with the same id and content changes nothing.")]
    user_id: Annotated[int, Field(ge=-INT64, le=INT64 - 1, description="A user of the live data snapshot.")]
    pin_id: Annotated[int, Field(ge=-INT64, le=INT64 - 1, description="A pin of the live data snapshot (any pin: "
                                 "it is remapped to its canonical pin as the batch path does).")]
    event_type: Literal["impression", "closeup", "click", "save", "hide"]
    event_timestamp: Annotated[AwareDatetime, Field(strict=False, description="When it happened: an ISO 8601 time with "
                                               "a UTC offset, not later than the service's clock plus "
                                               "ingest.max_future_seconds.")]
    surface: Literal["homefeed", "search", "related"] = "homefeed"


class EventsRequest(BaseModel):
    """Body of POST /events: a batch applied whole or not at all."""

    model_config = ConfigDict(extra="forbid", strict=True)

    events: Annotated[list[Event], Field(min_length=1, max_length=INGEST.max_events)]


class EventsResponse(BaseModel):
    accepted: int = Field(description="Events written to the event log by this request (durable before the answer).")
    duplicates: int = Field(description="Events whose id was already logged with the same content, or sent again in "
                                        "the same batch (unchanged).")
    users_pushed: int = Field(description="Users whose fresh features this request pushed to the online store (0 when "
                                          "a concurrent request's push already carried this batch's events).")
    timings_ms: dict[str, float]


class ErrorBody(BaseModel):
    """Every error response of the service."""

    error: str
    field: str | None = None
    details: list[dict[str, Any]] | None = None


def error(status: int, message: str, field: str | None = None, details: list | None = None,
          retry_after: int | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    headers = {**({"Retry-After": str(retry_after)} if retry_after else {}), **(headers or {})} or None
    return JSONResponse({"error": message, "field": field, "details": details}, status_code=status, headers=headers)


OPS_PATHS = frozenset({"/healthz", "/livez", "/readyz", "/metadata", "/metrics"})
ROUTES = frozenset({"/retrieve", "/events", "/docs.json", "/", "/docs", *OPS_PATHS})
"""Paths the service answers; anything else is 404 and counted as 'unmatched' (bounded metric labels)."""
METHODS = {"/retrieve": ("POST",), "/events": ("POST",)}
"""The methods of each route (the others: GET); any other method is a 405 naming them in ``Allow``."""


class RequestGuard:
    """ASGI middleware in front of the API, before anything parses a body:

    - 404 for unknown paths (one 'unmatched' metric label for all of them);
    - 503 + Retry-After past the worker's in-flight limit of POST /retrieve (load shedding, decided at once; the
      limit adapts to the latency of the admitted requests: bentos/admission.py);
    - 415 unless a POST body is JSON (or untyped); 413 for bodies over ``max_bytes`` (declared or streamed);
    - 408 when the body does not arrive within ``body_seconds``;
    - 400 bodies of BentoML's own validation reshaped to the service's error shape (naming the field).
    """

    def __init__(self, app, max_bytes: int, max_in_flight: int, body_seconds: float,
                 gate: Admission | None = None, latency_target_seconds: float = 0.5, ingest_bytes: int | None = None):
        self.app = app
        self.max_bytes = max_bytes
        self.ingest_bytes = ingest_bytes or max_bytes
        self.body_seconds = body_seconds
        self.gate = gate if gate is not None else Admission(max_in_flight, latency_target_seconds)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope["path"], scope["method"]
        route = path if path in ROUTES else "unmatched"
        started = time.perf_counter()
        status = {"code": 500}

        async def counted_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            if route == "unmatched":
                return await error(404, f"no such endpoint: {method} {path}", "path")(scope, receive, counted_send)
            allowed = METHODS.get(path, ("GET",))
            if method not in allowed:
                return await error(405, f"{method} is not allowed on {path}: use {', '.join(allowed)}", "method",
                                   headers={"Allow": ", ".join(allowed)})(scope, receive, counted_send)
            if path == "/events":   # not shed: an engagement refused is an engagement the client must keep
                return await self._guarded(scope, receive, counted_send, self.ingest_bytes)
            if path != "/retrieve" or method != "POST":
                return await self.app(scope, receive, counted_send)
            gate = self.gate
            if not gate.try_acquire():
                return await error(503, f"overloaded: {gate.in_flight} requests in flight, the worker's limit "
                                        f"(serve.max_in_flight {gate.max_limit}, adapted to "
                                        f"serve.latency_target_seconds)", retry_after=1)(scope, receive, counted_send)
            admitted = time.perf_counter()
            try:
                await self._guarded(scope, receive, counted_send)
            finally:
                gate.release(time.perf_counter() - admitted)
        finally:
            METRICS.observe(route, method, status["code"], time.perf_counter() - started)

    async def _guarded(self, scope, receive, send, max_bytes: int | None = None):
        max_bytes = max_bytes or self.max_bytes
        too_big = error(413, f"request body is larger than {max_bytes} bytes", "body")
        headers = dict(scope.get("headers", []))
        encoding = headers.get(b"content-encoding", b"").strip().lower()
        if encoding not in (b"", b"identity"):
            return await error(415, f"Content-Encoding {encoding.decode(errors='replace')} is not supported: send the "
                                    "JSON body uncompressed", "content-encoding")(scope, receive, send)
        kind = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if kind not in (b"", b"application/json"):
            return await error(415, f"send the body as JSON with Content-Type: application/json, not "
                                    f"{kind.decode(errors='replace')}", "content-type")(scope, receive, send)
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > max_bytes:
            return await too_big(scope, receive, send)
        # read the whole body first, within the time and size limits, so that neither a slow client nor a huge
        # body ever reaches the handler
        body, deadline = b"", time.monotonic() + self.body_seconds
        while True:
            try:
                message = await asyncio.wait_for(receive(), timeout=max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                return await error(408, f"the request body did not arrive within {self.body_seconds:g} s",
                                   "body")(scope, receive, send)
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            if len(body) > max_bytes:
                return await too_big(scope, receive, send)
            if not message.get("more_body"):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        response: dict[str, Any] = {}

        async def reshaping_send(message):
            # BentoML answers its own validation errors with {"error": ..., "detail": [...]} and its timeout with
            # {"error": ...}: one shape everywhere
            if message["type"] == "http.response.start" and message["status"] in RESHAPED:
                response["start"] = message
                return None
            if "start" in response and message["type"] == "http.response.body":
                response["body"] = response.get("body", b"") + message.get("body", b"")
                if message.get("more_body"):
                    return None
                reshaped = RESHAPED[response["start"]["status"]](response["body"])
                await send({**response["start"], "headers": [(b"content-type", b"application/json"),
                                                             (b"content-length", str(len(reshaped)).encode())]})
                return await send({"type": "http.response.body", "body": reshaped})
            return await send(message)

        await self.app(scope, replay, reshaping_send)


def _reshape_504(raw: bytes) -> bytes:
    import json

    try:
        message = json.loads(raw or b"{}").get("error")
    except (ValueError, AttributeError):
        message = None
    return json.dumps({"error": f"timeout: {message or 'the request took too long'} (serve.request_seconds)",
                       "field": None, "details": None}).encode()


def _reshape_400(raw: bytes) -> bytes:
    import json

    try:
        body = json.loads(raw or b"{}")
    except ValueError:
        body = {"error": raw.decode(errors="replace")}
    if isinstance(body, dict) and "field" in body and "details" in body:
        return raw   # already ours
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, list) and detail:
        first = detail[0]
        loc = ".".join(str(p) for p in first.get("loc", [])) or None
        if loc is None and first.get("type") == "json_invalid":
            loc = "body"
        message = f"{loc}: {first.get('msg')}" if loc else str(first.get("msg"))
        details = [{"field": ".".join(str(p) for p in d.get("loc", [])) or None, "message": d.get("msg"),
                    "type": d.get("type")} for d in detail]
        return json.dumps({"error": message, "field": loc, "details": details}).encode()
    message = (body.get("error") if isinstance(body, dict) else None) or "bad request"
    if "JSON" in message or "json" in message or "Invalid" in message:
        return json.dumps({"error": f"body: not a JSON object ({message})", "field": "body", "details": None}).encode()
    return json.dumps({"error": message, "field": "body", "details": None}).encode()


RESHAPED = {400: _reshape_400, 504: _reshape_504}
"""Statuses BentoML answers with bodies of its own, and how each becomes the service's error body."""

ops = FastAPI(title="retrieval ops")


@ops.get("/healthz", summary="Liveness: 200 while the process runs (also under load)")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@ops.get("/livez", summary="Liveness, as Kubernetes names it: the same answer as /healthz")
def livez() -> dict[str, str]:
    return {"status": "ok"}


@ops.get("/readyz", summary="Readiness: 200 with the loaded release; 503 with the reason when no release is loaded "
                            "or the online store does not answer", responses={503: {"model": dict}})
def readyz():
    svc = bentoml.get_current_service()
    status = svc.retriever.status()
    store = svc.retriever.store_health()
    ready = status["ready"] and store["ok"]
    body = {**status, "ready": ready, "online_store": store}
    return JSONResponse(body, status_code=200 if ready else 503, headers=None if ready else {"Retry-After": "1"})


@ops.get("/metadata", summary="The service's version, the loaded release (with the project version that trained it), "
                              "the request limits and the deployment")
def metadata() -> dict[str, Any]:
    svc = bentoml.get_current_service()
    return {"version": __version__, **svc.retriever.status(),
            "limits": {"max_k": SERVE.max_k, "max_interests": SERVE.max_interests,
                       "max_body_bytes": SERVE.max_body_bytes, "max_in_flight": SERVE.max_in_flight},
            "admission": GATE.state(),
            "index": {"uri": CONFIG.index.uri or "embedded milvus-lite", "alias": CONFIG.index.alias},
            "online_store": CONFIG.features.online_store, "switches": svc.switches}


@ops.get("/metrics", summary="Prometheus metrics (labels: route template or 'unmatched', method, status)")
def metrics() -> Response:
    return Response(METRICS.render(), media_type="text/plain; version=0.0.4")


ERROR_RESPONSES = {
    "400": "a request field is missing, mistyped or out of range (`field` names it)",
    "404": "no such endpoint",
    "405": "the method is not allowed on this path (the Allow header names the one that is)",
    "408": "the request body did not arrive in time",
    "409": "the request is valid but the live release cannot answer it: a mode it was not trained for, or an interest "
           "id not in its data (GET /metadata lists both; `field` names which)",
    "413": "the request body is too large",
    "415": "the request body is not JSON, or is compressed (Content-Encoding)",
    "503": "no release is live, a store does not answer, or the service is shedding load (see Retry-After)",
    "504": "the request took longer than serve.request_seconds",
}


EVENTS_ERRORS = {
    "400": "the body is not JSON, a field is missing, mistyped or out of range, or the batch is empty or longer "
           "than ingest.max_events (`field` names it; nothing is applied)",
    "404": "no such endpoint",
    "405": "the method is not allowed on this path (the Allow header names the one that is)",
    "408": "the request body did not arrive in time",
    "409": "the batch is well formed but conflicts with the live data, the clock or the log: rows fail the events "
           "contract (a user or pin the live snapshot does not know, a time before contracts.min_timestamp or later "
           "than the service's clock + ingest.max_future_seconds), two events share an event_id with different "
           "content, or an event_id is already logged with different content (`details` lists every row; nothing "
           "is applied)",
    "413": "the request body is larger than ingest.max_body_bytes",
    "415": "the request body is not JSON, or is compressed (Content-Encoding)",
    "503": "the event log or the online store does not answer (see Retry-After): nothing is acknowledged, or the "
           "events are logged and the retry pushes them",
    "504": "the request took longer than serve.request_seconds",
}


API_DESCRIPTION = (
    "Candidate pins for a user from the live release: the user's online features (Feast) through the release's "
    "user tower, searched in the release's Milvus collection (learned), or the release's serving corpus by decayed "
    "engagement for a user with no history (cold start). Engagement events in real time (POST /events): logged "
    "durably, the users' recent-engagement features pushed online for their next request. Every error has one body, "
    "ErrorBody.")
"""The OpenAPI document's description (BentoML's default is its own readme text, which names the bento's tag)."""


def _schema(model: type[BaseModel], schemas: dict[str, Any]) -> dict[str, Any]:
    """``model``'s JSON schema as pydantic writes it (optional fields as ``anyOf`` with null, which BentoML's own
    generator drops), its nested models added to ``schemas``."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(schema.pop("$defs", {}))
    return schema


def document_errors(spec: dict[str, Any]) -> dict[str, Any]:
    """BentoML's OpenAPI of /retrieve, completed with what the service really answers: every error status with
    the one error body, the request's required fields, and no 500 (a fault in a store is a 503)."""
    spec["info"] = {"title": "retrieval", "version": __version__, "description": API_DESCRIPTION}
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    schemas["ErrorBody"] = ErrorBody.model_json_schema()
    ref = {"$ref": "#/components/schemas/ErrorBody"}
    metrics = spec.get("paths", {}).get("/metrics", {}).get("get")
    if metrics is not None:   # Prometheus text, not JSON
        metrics["responses"] = {"200": {"description": "Prometheus text exposition format",
                                        "content": {"text/plain": {"schema": {"type": "string"}}}}}
    for path, request, answer, ok_text, errors in (
            ("/retrieve", RetrieveRequest, RetrieveResponse, "the candidates", ERROR_RESPONSES),
            ("/events", EventsRequest, EventsResponse, "the batch is logged (durably) and pushed", EVENTS_ERRORS)):
        post = spec.get("paths", {}).get(path, {}).get("post")
        if post is None:
            continue
        responses = post.setdefault("responses", {})
        responses.pop("500", None)
        for status, text in errors.items():
            responses[status] = {"description": text, "content": {"application/json": {"schema": ref}}}
        body = post.get("requestBody", {}).get("content", {}).get("application/json", {})
        body["schema"] = _schema(request, schemas)
        post.setdefault("requestBody", {})["required"] = True
        ok = responses.setdefault("200", {"description": ok_text})
        ok["content"] = {"application/json": {"schema": _schema(answer, schemas)}}
    return spec


def settle_heap() -> None:
    """Move what is alive now (the loaded release: tower, encoder, corpus, clients) out of the garbage collector's
    sight. A full collection otherwise walks those objects again and again while requests run, pausing every thread:
    measured on 2 cores with 8 clients, /healthz p99 fell from 243-285 ms to 24 ms and accepted p99 from 300 ms to
    80 ms once they were frozen (bench/bench_overload.py). Everything frozen before is unfrozen and collected first,
    so a release retired since the last switch is freed, not kept frozen."""
    import gc

    gc.unfreeze()
    gc.collect()
    gc.freeze()


class OpsRoutes:
    """ASGI middleware: GET /healthz, /readyz, /metadata, /metrics go to ``ops`` (BentoML's own /healthz and
    /readyz would otherwise answer first, with an empty body); GET /docs.json is BentoML's OpenAPI completed by
    ``document_errors``."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "GET" and scope["path"] in OPS_PATHS:
            return await ops(scope, receive, send)
        if scope["type"] == "http" and scope["method"] == "GET" and scope["path"] == "/docs.json":
            import json

            parts: list[bytes] = []

            async def capture(message):
                if message["type"] == "http.response.body":
                    parts.append(message.get("body", b""))

            await self.app(scope, receive, capture)
            spec = document_errors(json.loads(b"".join(parts) or b"{}"))
            return await JSONResponse(spec)(scope, receive, send)
        return await self.app(scope, receive, send)


@bentoml.asgi_app(ops, path="/")
@bentoml.service(name="retrieval", workers=SERVE.workers, threads=SERVE.threads,
                 traffic={"timeout": SERVE.request_seconds}, metrics={"enabled": False})
class RetrievalService:
    """User id -> candidate pins from the live release (user tower + Milvus), cold start when unknown."""

    def __init__(self) -> None:
        quiet_client_errors()
        self.retriever = Retriever(CONFIG)
        self.ingestor = Ingestor(CONFIG, self.retriever.features)
        self.switches = 0
        self._stop = threading.Event()
        self._poll()
        self._thread = threading.Thread(target=self._follow, name="release-follower", daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        try:
            if self.retriever.refresh():
                self._catch_up()
                self.switches += 1
                settle_heap()
            fault_log.clear("registry")
        except Exception as e:  # noqa: BLE001 - keep serving the loaded release; retry on the next poll
            fault_log.warning("registry", "could not load the live release (%s); still serving %s", e,
                              self.retriever.current.version if self.retriever.current else "nothing")

    def _catch_up(self) -> None:
        """Push the events the log holds but the online store does not (a crash between commit and push), and build
        the events contract and read what a push needs from the new live snapshot now rather than in the first
        POST /events."""
        try:
            self.ingestor.schema()
            self.ingestor.pusher.warm()
            done = self.ingestor.catch_up()
            if done["users"]:
                log.info("event log: pushed %d pending users' features", done["users"])
        except Exception as e:  # noqa: BLE001 - the next batch or retry pushes them
            fault_log.warning("event log", "could not push pending events (%s)", e)

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
                                             exclude_seen=request["exclude_seen"], mode=request["mode"])
        except RetrievalError as e:
            return error(e.status, str(e), e.field)
        except NotReady as e:
            return error(503, str(e), retry_after=5)
        except StoreUnavailable as e:
            fault_log.warning(e.store, "%s", e)
            return error(503, str(e), retry_after=1)
        fault_log.clear("online store")
        fault_log.clear("index")
        return RetrieveResponse(**result)


    @bentoml.api(route="/events", input_spec=EventsRequest, output_spec=EventsResponse)
    def events(self, **request: Any):
        """Engagement events in real time, logged durably and pushed to the users' online features.

        Each event is in the event log before the answer; the users' recent-engagement features are pushed to the
        online store for their next request, and the next build reads the log too. A batch is applied whole or not at
        all."""
        try:
            events = [e.model_dump() if isinstance(e, BaseModel) else e for e in request["events"]]
            result = self.ingestor.ingest(events)
        except IngestError as e:
            return error(e.status, str(e), e.field, e.details)
        except LogUnavailable as e:
            fault_log.warning("event log", "%s", e)
            return error(503, f"{e}; nothing of the batch was acknowledged", retry_after=1)
        except PushFailed as e:
            fault_log.warning("online store", "%s", e)
            return error(503, str(e), retry_after=1)
        fault_log.clear("event log")
        return EventsResponse(**result)


RetrievalService.add_asgi_middleware(OpsRoutes)
RetrievalService.add_asgi_middleware(RequestGuard, max_bytes=SERVE.max_body_bytes, max_in_flight=SERVE.max_in_flight,
                                     gate=GATE,
                                     body_seconds=SERVE.body_seconds, ingest_bytes=INGEST.max_body_bytes)
