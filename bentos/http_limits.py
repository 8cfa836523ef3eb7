"""Limits on a request's header block, enforced where the HTTP parser reads it.

uvicorn's httptools protocol (what BentoML serves with) accepts a header block of any size and waits for it
forever: one 96 MiB header held a worker for seconds and raised its memory by hundreds of MB, and connections that
send half a header stay open. ``LimitedHttpToolsProtocol`` is that protocol with two limits:

- a request whose header block grows past ``max_header_bytes`` is answered 431 and its connection closed, as soon
  as the parser has read that much (what it keeps in memory is bounded by the limit plus one network read);
- a connection that has not finished a request's header block ``header_seconds`` after it opened (or after the
  request's first byte, on a kept-alive connection) is answered 408 and closed.

Both answers carry the service's error body. And a POST /retrieve that the worker's admission (bentos/admission.py)
would refuse is shed as soon as its headers are parsed: its body is skipped, no ASGI cycle is made, and the 503
(with Retry-After) is written ``shed_delay`` seconds later while the connection stays open, reading nothing more
until then. Shedding so costs the worker a timer, not a request's worth of middleware, and a client that sends
again at once on a 503 (ignoring Retry-After) can send at most one request per ``shed_delay`` instead of spinning
the worker: measured with 256 and 1,000 such clients, answering at once left the worker 3-7% of its throughput.
With many of them waiting, the delay grows: the n-th refusal waiting in this process is answered after
max(``shed_delay``, n / ``shed_rate``) seconds, so the worker writes at most ``shed_rate`` 503s a second however many
clients send again at once (with 1,000 of them, answering each after 1 s still left it 54-64% of its throughput).

``install`` makes uvicorn's "auto" HTTP protocol this class; the service calls it at import, which in a BentoML
worker is before uvicorn loads its config.
"""

from __future__ import annotations

import json
import logging

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from bentos import admission

log = logging.getLogger("retrieval.service")


def _response(status: int, reason: str, message: str, field: str | None, close: bool = True,
              extra: str = "") -> bytes:
    body = json.dumps({"error": message, "field": field, "details": None}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            + extra + ("connection: close\r\n" if close else "") + "\r\n").encode() + body


SHED = _response(503, "Service Unavailable", "overloaded: the worker is at its in-flight limit (serve.max_in_flight, "
                 "adapted to serve.latency_target_seconds)", None, close=False, extra="retry-after: 1\r\n")
"""The answer to a request shed before its body is read (kept-alive: the client may send the next one)."""


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header size limit (431) and a header read timeout (408)."""

    max_header_bytes = 16_384
    header_seconds = 5.0
    shed_delay = 1.0
    shed_rate = 100.0
    waiting_sheds = 0
    """Refused requests of this process whose 503 is not written yet (one event loop per worker: no lock)."""

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_bytes = 0
        self._in_headers = True
        self._header_timer = self.loop.call_later(self.header_seconds, self._header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_timer()
        self._stop_shed_timer()
        super().connection_lost(exc)

    def _stop_shed_timer(self) -> None:
        timer = getattr(self, "_shed_timer", None)
        if timer is not None:
            timer.cancel()
            self._shed_timer = None
            LimitedHttpToolsProtocol.waiting_sheds -= 1

    def _stop_header_timer(self) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
            self._header_timer = None

    def _reject(self, raw: bytes) -> None:
        self._stop_header_timer()
        self._in_headers = False
        if not self.transport.is_closing():
            self.transport.write(raw)
            self.transport.close()

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self._in_headers and not self.transport.is_closing():
            log.info("408: request headers not complete within %gs (serve.header_seconds)", self.header_seconds)
            self._reject(_response(408, "Request Timeout", f"the request headers did not arrive within "
                                   f"{self.header_seconds:g} s", "headers"))

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if not self._in_headers:   # the next request on a kept-alive connection: its headers are timed afresh
            self._in_headers = True
            self._header_bytes = 0
            self._stop_header_timer()
            self._header_timer = self.loop.call_later(self.header_seconds, self._header_timeout)

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._stop_header_timer()
        gate = admission.ADMISSION
        if gate is not None and gate.full() and self.parser.get_method() == b"POST" \
                and httptools.parse_url(self.url).path == b"/retrieve":
            gate.refuse()
            self._shedding = True   # its body is skipped; the connection stays open for the next request
            self.transport.pause_reading()   # nothing more from this client before its answer
            LimitedHttpToolsProtocol.waiting_sheds += 1
            delay = max(self.shed_delay, LimitedHttpToolsProtocol.waiting_sheds / self.shed_rate)
            self._shed_timer = self.loop.call_later(delay, self._send_shed)
            return
        super().on_headers_complete()

    def _send_shed(self) -> None:
        self._shed_timer = None
        LimitedHttpToolsProtocol.waiting_sheds -= 1
        if not self.transport.is_closing():
            self.transport.write(SHED)
            self.transport.resume_reading()

    def on_body(self, body: bytes) -> None:
        if not getattr(self, "_shedding", False):
            super().on_body(body)

    def on_message_complete(self) -> None:
        if getattr(self, "_shedding", False):
            self._shedding = False
            self._header_bytes = 0
            return
        super().on_message_complete()
        self._header_bytes = 0

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():
            return
        if self._in_headers:
            self._header_bytes += len(data)
        super().data_received(data)
        if self._in_headers and self._header_bytes > self.max_header_bytes:
            log.info("431: request headers over %d bytes (serve.max_header_bytes)", self.max_header_bytes)
            self._reject(_response(431, "Request Header Fields Too Large", f"the request headers are larger than "
                                   f"{self.max_header_bytes} bytes", "headers"))


def install(max_header_bytes: int, header_seconds: float, shed_delay: float = 1.0, shed_rate: float = 100.0) -> None:
    """Make uvicorn's "auto" HTTP protocol ``LimitedHttpToolsProtocol`` with these limits (this process)."""
    import uvicorn.config

    LimitedHttpToolsProtocol.max_header_bytes = max_header_bytes
    LimitedHttpToolsProtocol.header_seconds = header_seconds
    LimitedHttpToolsProtocol.shed_delay = shed_delay
    LimitedHttpToolsProtocol.shed_rate = shed_rate
    uvicorn.config.HTTP_PROTOCOLS["auto"] = f"{__name__}:LimitedHttpToolsProtocol"
