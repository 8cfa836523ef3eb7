"""The service's logs stay bounded: serve.log rotates (bentos/logpipe.py), a recurring store fault is logged once
per interval with a repeat count (bentos/observability.py)."""

from __future__ import annotations

import logging
import subprocess
import sys

from bentos.observability import RateLimitedLog


def test_logpipe_rotates_and_passes_the_exit_code(tmp_path):
    log = tmp_path / "serve.log"
    script = "import sys\nfor i in range(2000): print('x' * 99)\nsys.exit(3)"
    rc = subprocess.run([sys.executable, "-m", "bentos.logpipe", str(log), "20000", "2", "--",
                         sys.executable, "-c", script], timeout=60).returncode
    assert rc == 3
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["serve.log", "serve.log.1", "serve.log.2"]             # 200 KB written, 3 × 20 KB kept
    assert all(p.stat().st_size <= 20000 for p in tmp_path.iterdir())


def test_a_recurring_fault_is_logged_once_per_interval(caplog, monkeypatch):
    clock = [100.0]
    monkeypatch.setattr("bentos.observability.time.monotonic", lambda: clock[0])
    faults = RateLimitedLog(logging.getLogger("test.faults"), every=60)
    with caplog.at_level(logging.WARNING, logger="test.faults"):
        for _ in range(50):                      # one a second for 50 s: one line
            faults.warning("registry", "registry unreadable: %s", "bad json")
            clock[0] += 1
        clock[0] += 20                           # past the interval: one line with the count
        faults.warning("registry", "registry unreadable: %s", "bad json")
        faults.clear("registry")
        faults.clear("registry")                 # clearing twice logs once
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["registry unreadable: bad json",
                     "registry unreadable: bad json (repeated 49 times in the last 70 s)", "registry: recovered"]
