"""The launcher in process: the command and environment it gives the service (the effective config goes along
as a file), the readiness poll, and stop without a running service. Start + stop on a real `bentoml serve`
run in tests/bentos/test_service.py."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from bentos.launcher import NotReadyError, command, stop, wait_ready
from training.config import CONFIG_ENV, Config


def test_command_hands_the_effective_config_to_the_service(tmp_path):
    cfg = Config(data_dir=str(tmp_path))
    cfg = dataclasses.replace(cfg, serve=dataclasses.replace(cfg.serve, port=4123, workers=2))
    cmd, env = command(cfg)
    assert cmd[1:3] == ["serve", "bentos.service:RetrievalService"] and cmd[-2:] == ["--port", "4123"]
    assert env["BENTOML_HOME"] == str(tmp_path / "bentoml")
    loaded = Config.load(env[CONFIG_ENV])
    assert loaded == cfg   # flags given to the launcher reach the service


class _Ready(BaseHTTPRequestHandler):
    calls = 0

    def do_GET(self):  # noqa: N802 - http.server's naming
        type(self).calls += 1
        ready = type(self).calls >= 3
        body = b'{"ready": true, "release": {"model_version": "v"}}' if ready else b"{}"
        self.send_response(200 if ready else 503)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_wait_ready_polls_until_200():
    server = HTTPServer(("127.0.0.1", 0), _Ready)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        body = wait_ready(f"http://127.0.0.1:{server.server_port}", timeout_s=10, poll_s=0.05)
        assert body["release"]["model_version"] == "v" and _Ready.calls == 3
    finally:
        server.shutdown()


def test_wait_ready_gives_up_on_a_dead_process_or_the_deadline():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    with pytest.raises(NotReadyError, match="exited with code 0"):
        wait_ready("http://127.0.0.1:9", timeout_s=30, proc=proc, poll_s=0.05)
    with pytest.raises(NotReadyError, match="did not answer 200"):
        wait_ready("http://127.0.0.1:9", timeout_s=0.2, poll_s=0.05)


def test_stop_without_a_service_is_a_no_op(tmp_path):
    assert stop(Config(data_dir=str(tmp_path))) == {"stopped": None}


def test_a_refused_start_leaves_the_running_service_alone(tmp_path):
    """`start` on a port another process holds is refused before anything is stopped: the data dir's running
    service (here a stand-in process recorded in serve.pid) keeps running."""
    import json
    import socket

    from bentos.launcher import start

    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    other = socket.socket()
    other.bind(("127.0.0.1", 0))
    other.listen()
    port = other.getsockname()[1]
    cfg = Config(data_dir=str(tmp_path))
    cfg = dataclasses.replace(cfg, serve=dataclasses.replace(cfg.serve, port=port))
    (tmp_path / "serve.pid").write_text(json.dumps({"pid": running.pid, "descendants": []}))
    try:
        with pytest.raises(RuntimeError, match=f"{port} is already in use by another process"):
            start(cfg, timeout_s=5)
        assert running.poll() is None, "the running service was stopped by a start that could not bind"
        assert (tmp_path / "serve.pid").exists()
    finally:
        other.close()
        running.kill()
        running.wait()


def test_a_recorded_worker_that_exits_while_it_is_looked_at_counts_as_stopped(monkeypatch):
    """A recorded worker can exit between a check that it exists and the look at its state; `stop` treats it
    as gone instead of failing on the lookup."""
    import psutil

    from bentos import launcher

    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    monkeypatch.setattr(psutil, "pid_exists", lambda pid: True)   # it existed when checked, gone when looked at
    assert launcher._alive([done.pid, os.getpid()]) == [os.getpid()]
