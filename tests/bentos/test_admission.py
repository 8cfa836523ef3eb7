"""The adaptive in-flight limit (bentos/admission.py): it falls when the admitted requests get slow, rises while
they are fast and the limit binds, stays within its bounds, and counts what it sheds."""

from __future__ import annotations

from bentos.admission import Admission


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _window(gate: Admission, clock: Clock, seconds: float, n: int) -> None:
    """``n`` requests admitted and finished after ``seconds`` each, then the window closes."""
    for _ in range(n):
        assert gate.try_acquire()
    clock.now += gate.window
    for _ in range(n):
        gate.release(seconds)


def test_slow_requests_lower_the_limit_down_to_its_floor():
    clock = Clock()
    gate = Admission(32, target_seconds=0.25, min_limit=4, clock=clock)
    limits = []
    for _ in range(20):
        _window(gate, clock, seconds=1.0, n=2)
        limits.append(int(gate.limit))
    assert limits[0] == 24 and limits == sorted(limits, reverse=True) and limits[-1] == 4


def test_fast_requests_raise_the_limit_only_when_it_binds():
    clock = Clock()
    gate = Admission(32, target_seconds=0.25, min_limit=4, clock=clock)
    gate.limit = 8.0
    _window(gate, clock, seconds=0.01, n=3)   # fast, but far below the limit: no reason to admit more
    assert int(gate.limit) == 8
    _window(gate, clock, seconds=0.01, n=8)   # fast and at the limit
    assert int(gate.limit) == 9
    for _ in range(100):
        _window(gate, clock, seconds=0.01, n=int(gate.limit))
    assert int(gate.limit) == 32   # never above serve.max_in_flight


def test_past_the_limit_requests_are_shed_and_counted():
    gate = Admission(3, target_seconds=0.25)
    assert [gate.try_acquire() for _ in range(5)] == [True, True, True, False, False]
    assert gate.full() and gate.state()["shed"] == 2 and gate.state()["in_flight"] == 3
    gate.refuse()
    assert gate.shed == 3
    gate.release(0.01)
    assert not gate.full() and gate.try_acquire()
