"""The header limits of bentos/http_limits.py on a real uvicorn server (the protocol BentoML's workers run): an
oversized header block is a 431 at once and costs the worker nothing, a header block that never completes is a 408,
and neither slows the requests of other clients."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest
import uvicorn

from bentos.http_limits import LimitedHttpToolsProtocol

LIMIT = 16_384
HEADER_SECONDS = 0.5


async def _app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b'{"status": "ok"}'})


class _Limited(LimitedHttpToolsProtocol):
    max_header_bytes = LIMIT
    header_seconds = HEADER_SECONDS


@pytest.fixture(scope="module")
def server():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(_app, http=_Limited, log_config=None, lifespan="off", timeout_keep_alive=5)
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    port = sock.getsockname()[1]
    deadline = time.monotonic() + 10
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield port
    srv.should_exit = True
    thread.join(5)


def _read_response(s: socket.socket, timeout: float = 5.0) -> bytes:
    s.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = s.recv(65536)
        except (TimeoutError, ConnectionResetError):
            break
        if not chunk:
            break
        data += chunk
    return data


def test_a_header_block_over_the_limit_is_a_431_at_once(server):
    s = socket.create_connection(("127.0.0.1", server))
    started = time.perf_counter()
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
    sent, refused = 0, False
    try:
        while sent < 8 << 20:   # a client that goes on sending: the server stops reading at the limit
            s.sendall(b"a" * 65536)
            sent += 65536
    except (BrokenPipeError, ConnectionResetError):
        refused = True
    answer = _read_response(s)
    elapsed = time.perf_counter() - started
    s.close()
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert body["field"] == "headers" and str(LIMIT) in body["error"]
    assert refused or sent < 8 << 20 or elapsed < 2, "the oversized header was read to its end"
    assert elapsed < 2


def test_headers_under_the_limit_and_kept_alive_requests_are_served(server):
    with httpx.Client(base_url=f"http://127.0.0.1:{server}") as c:
        for _ in range(3):   # one kept-alive connection
            r = c.get("/healthz", headers={"X-Fine": "a" * (LIMIT // 2)})
            assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_a_header_block_that_never_completes_is_a_408(server):
    s = socket.create_connection(("127.0.0.1", server))
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")   # and nothing more
    started = time.perf_counter()
    answer = _read_response(s, timeout=HEADER_SECONDS * 10)
    s.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert HEADER_SECONDS * 0.8 <= time.perf_counter() - started < HEADER_SECONDS * 5


def test_open_partial_headers_do_not_slow_other_clients(server):
    """100 connections that send half a header, then /healthz from another client: it answers at once, and the
    partial connections are closed by the header timeout."""
    partial = []
    for _ in range(100):
        s = socket.create_connection(("127.0.0.1", server))
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        partial.append(s)
    try:
        times = []
        with httpx.Client(base_url=f"http://127.0.0.1:{server}") as c:
            for _ in range(50):
                t = time.perf_counter()
                assert c.get("/healthz").status_code == 200
                times.append(time.perf_counter() - t)
        times.sort()
        assert times[int(len(times) * 0.99) - 1] < 0.05, times[-5:]
        time.sleep(HEADER_SECONDS * 3)
        closed = sum(_read_response(s, timeout=0.5).startswith(b"HTTP/1.1 408") for s in partial)
        assert closed == len(partial)
    finally:
        for s in partial:
            s.close()


def test_install_makes_it_uvicorns_auto_protocol():
    import uvicorn.config

    from bentos.http_limits import install

    before = dict(uvicorn.config.HTTP_PROTOCOLS)
    try:
        install(1234, 2.0)
        config = uvicorn.Config(_app)
        config.load()
        assert config.http_protocol_class is LimitedHttpToolsProtocol
        assert LimitedHttpToolsProtocol.max_header_bytes == 1234
    finally:
        uvicorn.config.HTTP_PROTOCOLS.clear()
        uvicorn.config.HTTP_PROTOCOLS.update(before)
        LimitedHttpToolsProtocol.max_header_bytes, LimitedHttpToolsProtocol.header_seconds = LIMIT, 5.0



def test_a_full_worker_sheds_retrieve_in_the_protocol_and_keeps_the_connection(server):
    """With the worker's admission full, POST /retrieve is a 503 with Retry-After written as soon as its headers are
    parsed (the app never sees it) and the kept-alive connection serves the next request."""
    from bentos import admission

    gate = admission.install(1, 0.25)
    assert gate.try_acquire() and gate.full()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{server}") as c:
            r = c.post("/retrieve", json={"user_id": 1})
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert r.json()["error"].startswith("overloaded")
            assert c.get("/healthz").status_code == 200   # same connection, other paths unaffected
            gate.release(0.01)
            assert c.post("/retrieve", json={"user_id": 1}).status_code == 200   # admitted again: the app answers
        assert gate.shed == 1
    finally:
        admission.ADMISSION = None


def test_refusals_are_paced_to_the_shed_rate_and_a_closed_connection_frees_its_place(server, monkeypatch):
    """Many refused requests at once: the n-th waiting 503 is written about n / shed_rate seconds later (never before
    shed_delay), so clients that send again at once cannot make refusing cost the worker more than shed_rate answers
    a second; a client that leaves before its answer stops counting."""
    from bentos import admission

    monkeypatch.setattr(_Limited, "shed_delay", 0.05)
    monkeypatch.setattr(_Limited, "shed_rate", 20.0)
    gate = admission.install(1, 0.25)
    assert gate.try_acquire() and gate.full()
    request = b"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
    try:
        leaver = socket.create_connection(("127.0.0.1", server))
        leaver.sendall(request)
        clients = [socket.create_connection(("127.0.0.1", server)) for _ in range(8)]
        start = time.perf_counter()
        for s in clients:
            s.sendall(request)
        time.sleep(0.02)
        leaver.close()
        answered = []
        for s in clients:
            s.settimeout(2.0)
            assert s.recv(65536).startswith(b"HTTP/1.1 503")   # one small write; the connection stays open
            answered.append(time.perf_counter() - start)
            s.close()
        # 9 refusals waiting at most: the last of them waits about 9 / 20 s, the first shed_delay; none in between
        # is answered before its place in the queue allows.
        assert max(answered) >= 0.3, answered
        assert min(answered) < 0.3, answered
        deadline = time.monotonic() + 2
        while LimitedHttpToolsProtocol.waiting_sheds and time.monotonic() < deadline:
            time.sleep(0.01)
        assert LimitedHttpToolsProtocol.waiting_sheds == 0
        assert gate.shed == 9
    finally:
        admission.ADMISSION = None
