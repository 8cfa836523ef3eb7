"""What the service tells operators: request metrics with bounded labels, and logs that stay readable.

- ``METRICS``: a Prometheus registry of its own (BentoML's metrics, keyed on the raw request path, are off):
  requests and latency labelled by route template (or 'unmatched'), method and status.
- ``RateLimitedLog``: a fault that repeats (a broken registry polled every second, a store that is down) is logged
  when it starts, then at most once per ``every`` seconds with how often it recurred, and once when it clears.
- ``quiet_client_errors``: BentoML logs a request that fails validation as an ERROR with a full traceback; that
  is the client's fault, so it becomes one INFO line.
"""

from __future__ import annotations

import logging
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest


class RequestMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("retrieval_requests", "HTTP requests", ["route", "method", "status"],
                                registry=self.registry)
        self.latency = Histogram("retrieval_request_seconds", "HTTP request latency", ["route", "method"],
                                 registry=self.registry,
                                 buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0))

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        method = method if method in ("GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH") else "OTHER"
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route, method).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


METRICS = RequestMetrics()


class RateLimitedLog:
    """Log a recurring fault once, then at most once per ``every`` seconds, and once when it clears."""

    def __init__(self, logger: logging.Logger, every: float = 60.0):
        self.logger = logger
        self.every = every
        self._faults: dict[str, list[float]] = {}   # key -> [last logged, repeats since]
        self._lock = threading.Lock()

    def warning(self, key: str, msg: str, *args) -> None:
        now = time.monotonic()
        with self._lock:
            seen = self._faults.get(key)
            if seen is None:
                self._faults[key] = [now, 0]
                self.logger.warning(msg, *args)
            elif now - seen[0] >= self.every:
                self.logger.warning(msg + " (repeated %d times in the last %.0f s)", *args, seen[1], now - seen[0])
                self._faults[key] = [now, 0]
            else:
                seen[1] += 1

    def clear(self, key: str) -> None:
        with self._lock:
            if self._faults.pop(key, None) is not None:
                self.logger.warning("%s: recovered", key)


class _ClientErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and type(exc).__name__ in ("ValidationError", "BadInput", "JSONDecodeError"):
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg = f"rejected a bad request: {str(exc).splitlines()[0][:200]}"
            record.args = ()
            record.exc_info = record.exc_text = None
        return True


def quiet_client_errors() -> None:
    for name in ("bentoml._internal.server.http_app", "_bentoml_impl.server.app", "bentoml.access"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _ClientErrors) for f in logger.filters):
            logger.addFilter(_ClientErrors())
