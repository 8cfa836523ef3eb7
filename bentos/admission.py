"""Admission of POST /retrieve in one worker: how many requests may be in flight, adapted to measured latency.

A fixed in-flight limit admits what the machine can serve only when it was chosen for that machine, that model and
that index; past it, every admitted request waits behind the others and latency grows with the limit, not with the
load. ``Admission`` starts at ``serve.max_in_flight`` and moves the limit by what the admitted requests took, every
``window`` seconds (additive increase, multiplicative decrease):

- when more than ``slow_share`` of the requests finished in the window took longer than ``target_seconds``, the limit
  falls to ``decrease`` times itself (never below ``min_limit``);
- when none did and the limit was reached in the window, it rises by one (never above ``serve.max_in_flight``).

A request past the limit is refused at once with 503 and Retry-After, before its body is read: in the HTTP protocol
(bentos/http_limits.py), as soon as its headers are parsed, which costs the worker a few microseconds, and again in
the ASGI guard (bentos/service.py), which is where a request is admitted. Everything here runs on the worker's event
loop thread, so it needs no lock.
"""

from __future__ import annotations

import time


class Admission:
    """The in-flight limit of one worker and the counters behind it."""

    def __init__(self, max_limit: int, target_seconds: float, min_limit: int = 2, window: float = 0.25,
                 slow_share: float = 0.1, decrease: float = 0.75, clock=time.monotonic):
        self.max_limit = max_limit
        self.min_limit = min(min_limit, max_limit)
        self.target_seconds = target_seconds
        self.window = window
        self.slow_share = slow_share
        self.decrease = decrease
        self.clock = clock
        self.limit = float(max_limit)
        self.in_flight = 0
        self.admitted = 0
        self.shed = 0
        self._window_start = clock()
        self._done = 0
        self._slow = 0
        self._saturated = False

    def full(self) -> bool:
        """True when one more request would pass the limit (the request is refused)."""
        return self.in_flight >= int(self.limit)

    def try_acquire(self) -> bool:
        """Admit one request (True), or count it shed (False)."""
        if self.full():
            self.shed += 1
            self._saturated = True
            return False
        self.in_flight += 1
        self.admitted += 1
        if self.in_flight >= int(self.limit):
            self._saturated = True
        return True

    def refuse(self) -> None:
        """Count a request shed before it reached ``try_acquire`` (by the HTTP protocol)."""
        self.shed += 1
        self._saturated = True

    def release(self, seconds: float) -> None:
        """One admitted request finished after ``seconds``; every ``window`` the limit moves."""
        self.in_flight -= 1
        self._done += 1
        self._slow += seconds > self.target_seconds
        now = self.clock()
        if now - self._window_start < self.window:
            return
        if self._slow > self.slow_share * self._done:
            self.limit = max(float(self.min_limit), self.limit * self.decrease)
        elif self._slow == 0 and self._saturated:
            self.limit = min(float(self.max_limit), self.limit + 1)
        self._window_start, self._done, self._slow, self._saturated = now, 0, 0, False

    def state(self) -> dict[str, float | int]:
        return {"limit": int(self.limit), "max_limit": self.max_limit, "in_flight": self.in_flight,
                "admitted": self.admitted, "shed": self.shed, "target_seconds": self.target_seconds}


ADMISSION: Admission | None = None
"""This worker's admission, made by the service at import (None outside a service process)."""


def install(max_limit: int, target_seconds: float, min_limit: int = 2) -> Admission:
    global ADMISSION
    ADMISSION = Admission(max_limit, target_seconds, min_limit=min_limit)
    return ADMISSION
