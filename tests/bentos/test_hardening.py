"""Failure modes an operator meets: bad inputs at the edges of the types, slow and oversized bodies, load past the
in-flight limit, faults in the online store and the registry, log noise, metric cardinality, a taken port."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import sqlite3

import httpx
import pytest

from training.release.registry import Registry, ReleaseError

pytestmark = pytest.mark.slow


# --- the request guard alone (an ASGI app that answers after a delay) -------------------------------------------


def _slow_app(delay: float):
    async def app(scope, receive, send):
        while True:
            message = await receive()
            if not message.get("more_body"):
                break
        await asyncio.sleep(delay)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b"{}"})

    return app


def test_load_past_the_in_flight_limit_is_shed_at_once_with_503():
    from bentos.service import RequestGuard

    guard = RequestGuard(_slow_app(0.3), max_bytes=1000, max_in_flight=2, body_seconds=5)

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=guard), base_url="http://t") as c:
            return await asyncio.gather(*[c.post("/retrieve", json={"user_id": 1}) for _ in range(5)],
                                        c.get("/healthz"))

    *answers, health = asyncio.run(main())
    codes = sorted(r.status_code for r in answers)
    assert codes == [200, 200, 503, 503, 503]
    shed = next(r for r in answers if r.status_code == 503)
    assert shed.headers["retry-after"] == "1" and shed.json()["error"].startswith("overloaded")
    assert health.status_code == 200   # ops endpoints are never shed


def test_a_slow_body_is_a_408_and_unknown_paths_a_bounded_404():
    from bentos.observability import METRICS
    from bentos.service import RequestGuard

    guard = RequestGuard(_slow_app(0), max_bytes=1000, max_in_flight=8, body_seconds=0.2)
    sent = []

    async def slow_receive():
        await asyncio.sleep(5)
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/retrieve", "headers": [(b"content-type", b"application/json")]}
    asyncio.run(guard(scope, slow_receive, send))
    assert sent[0]["status"] == 408 and json.loads(sent[1]["body"])["field"] == "body"

    async def lost(path):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=guard), base_url="http://t") as c:
            return await c.get(path)

    for i in range(50):
        r = asyncio.run(lost(f"/no/such/{i}"))
        assert r.status_code == 404 and r.json()["field"] == "path"
    text = METRICS.render().decode()
    assert 'route="unmatched"' in text and "/no/such/" not in text   # one label for every unknown path


# --- the real service in process ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(pipeline_cfg, checkpoints):
    from starlette.testclient import TestClient

    from tests.bentos.conftest import service_class
    from tests.conftest import unpublished
    from training.release.publish import publish

    cfg = unpublished(pipeline_cfg)
    publish(cfg, checkpoints[0])
    with TestClient(service_class(cfg.data_dir).to_asgi(), raise_server_exceptions=False) as c:
        c.cfg = cfg
        yield c


@pytest.mark.parametrize("body, field", [
    ({"user_id": 2**63}, "user_id"), ({"user_id": -(2**63) - 1}, "user_id"), ({"user_id": 1, "interests": None},
                                                                              "interests"),
    ({"user_id": 1, "k": 0}, "k"), ({}, "user_id"),
])
def test_every_400_has_one_shape_naming_the_field(client, body, field, caplog):
    with caplog.at_level(logging.INFO):
        r = client.post("/retrieve", json=body)
    assert r.status_code == 400, r.text
    assert set(r.json()) == {"error", "field", "details"} and r.json()["field"] == field
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR]   # a client error is no ERROR
    edge = client.post("/retrieve", json={"user_id": 2**63 - 1, "k": 3})   # the int64 edge
    assert edge.status_code == 200, edge.text


def test_a_store_fault_is_a_503_with_retry_after_and_recovers(client, monkeypatch):
    retriever = _service().retriever
    calls = {"n": 0}
    real = retriever.features.online

    def locked(*args, **kwargs):
        calls["n"] += 1
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(retriever.features, "online", locked)
    retriever._health = (0.0, {"ok": True})  # noqa: SLF001 - force a fresh probe
    r = client.post("/retrieve", json={"user_id": 1, "k": 3})
    assert r.status_code == 503 and r.headers["retry-after"] == "1" and "online store" in r.json()["error"]
    ready = client.get("/readyz")
    assert ready.status_code == 503 and not ready.json()["online_store"]["ok"]
    monkeypatch.setattr(retriever.features, "online", real)
    retriever._health = (0.0, {"ok": True})  # noqa: SLF001
    assert client.post("/retrieve", json={"user_id": 1, "k": 3}).status_code == 200
    assert client.get("/readyz").status_code == 200


def _service():
    """The service instance the in-process app created (BentoML exposes it only inside a request)."""
    import gc

    from bentos.service import RetrievalService

    gc.unfreeze()   # the service freezes the heap after a release loads; frozen objects are not listed
    return next(o for o in gc.get_objects() if isinstance(o, RetrievalService.inner))


def test_a_broken_registry_is_refused_with_a_clear_error(client, tmp_path):
    from training.config import Config

    cfg = Config(data_dir=str(tmp_path))
    reg = Registry(cfg)
    reg.dir.mkdir(parents=True)
    for bad, match in (("[]", "expected an object"), ('{"live": "../../etc/passwd", "history": [], "previous": []}',
                                                       "not a model version"),
                       ("{not json", "not readable JSON")):
        (reg.dir / "registry.json").write_text(bad)
        with pytest.raises(ReleaseError, match=match):
            reg.state()
    from training.cli import main

    (reg.dir / "registry.json").write_text("[]")
    assert main(["release", "status", "--data_dir", str(tmp_path)]) == 2


def test_start_refuses_a_port_taken_by_another_process(tmp_path):
    import dataclasses

    from bentos.launcher import start
    from training.config import Config

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        cfg = Config(data_dir=str(tmp_path))
        cfg = dataclasses.replace(cfg, serve=dataclasses.replace(cfg.serve, port=s.getsockname()[1]))
        with pytest.raises(RuntimeError, match="already in use"):
            start(cfg)


def test_kill_9_of_the_recorded_pid_leaves_nothing_stop_cannot_end(live):
    """Defect: `kill -9 $(cat serve.pid)` left the worker serving as an orphan that `stop` could not reach. The
    server runs in its own process group and `stop` ends the group and every recorded descendant."""
    import dataclasses
    import os
    import signal
    import time

    from bentos.launcher import _paths, port_taken, start, stop
    from tests.bentos.conftest import free_port

    cfg = dataclasses.replace(live, serve=dataclasses.replace(live.serve, port=free_port()))
    start(cfg)
    pid_file, _ = _paths(cfg)
    recorded = json.loads(pid_file.read_text())
    assert recorded["descendants"]                   # the workers are recorded, not only the leader
    os.kill(recorded["pid"], signal.SIGKILL)
    stop(cfg)
    deadline = time.monotonic() + 20
    while port_taken(cfg.serve.host, cfg.serve.port) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not port_taken(cfg.serve.host, cfg.serve.port)
    assert not [p for p in recorded["descendants"] if os.path.exists(f"/proc/{p}")
                and "zombie" not in open(f"/proc/{p}/status").read()]
