"""``retrieval stack up|down|status``: a local Milvus server and Redis for development and the test suite's server
tier, under ``<data_dir>/stack``, and the config that points the project at them.

- Milvus: the ``milvus`` pip package (Milvus 2.3.5 standalone run from Python; `pip install -e .[server]`),
  started by a small keeper process in its own session that stops the server on SIGTERM;
- Redis: ``redis-server`` from the system (Debian: ``apt-get install redis-server``), with its append-only file
  fsynced before each reply (the real-time event log, ``ingest.log redis``, is durable there; no snapshots).

Both listen on free loopback ports; ``<data_dir>/stack/stack.json`` records ports and pids. In a real deployment
these are the Milvus and Redis of the cluster (docs/how-to/scale-out.md); nothing here is used by the service itself.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from training.config import Config


class StackError(RuntimeError):
    """A stack component is missing or did not start."""


def stack_dir(cfg: Config) -> Path:
    return cfg.data_path / "stack"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def available() -> dict[str, str | None]:
    """Why each component cannot start here (None = it can)."""
    try:
        import milvus  # noqa: F401
        milvus_why = None
    except ImportError:
        milvus_why = "the `milvus` package is not installed (pip install -e '.[server]')"
    redis_why = None if shutil.which("redis-server") else "redis-server is not on PATH (apt-get install redis-server)"
    try:
        import redis  # noqa: F401
    except ImportError:
        redis_why = redis_why or "the `redis` client is not installed (pip install -e '.[server]')"
    return {"milvus": milvus_why, "redis": redis_why}


def status(cfg: Config) -> dict[str, Any]:
    path = stack_dir(cfg) / "stack.json"
    if not path.exists():
        return {"up": False}
    state = json.loads(path.read_text())
    state["milvus"]["answering"] = _answers(state["milvus"]["port"]) and _alive(state["milvus"]["pid"])
    state["redis"]["answering"] = _answers(state["redis"]["port"]) and _alive(state["redis"]["pid"])
    state["up"] = state["milvus"]["answering"] and state["redis"]["answering"]
    return state


def overrides(state: dict[str, Any]) -> dict[str, Any]:
    """The config that points the project at a running stack."""
    return {"index": {"uri": f"http://127.0.0.1:{state['milvus']['port']}", "index_type": "HNSW"},
            "features": {"online_store": "redis", "redis_connection": f"127.0.0.1:{state['redis']['port']}"}}


def up(cfg: Config, timeout: float = 120.0) -> dict[str, Any]:
    """Start Milvus and Redis (or return the running stack)."""
    current = status(cfg)
    if current.get("up"):
        return current
    if current.get("milvus") or current.get("redis"):
        down(cfg)
    missing = {k: v for k, v in available().items() if v}
    if missing:
        raise StackError("; ".join(f"{k}: {v}" for k, v in missing.items()))
    root = stack_dir(cfg)
    root.mkdir(parents=True, exist_ok=True)
    redis_port, milvus_port = _free_port(), _free_port()
    # the append-only file, fsynced before each reply: an event the service acknowledged is on disk (ingest.log redis)
    redis = subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "yes", "--appendfsync", "always", "--dir", str(root)],
                             stdout=open(root / "redis.log", "ab"), stderr=subprocess.STDOUT, start_new_session=True)
    milvus = subprocess.Popen([sys.executable, "-m", "training.stack", "_keep_milvus", str(root / "milvus"),
                               str(milvus_port)], stdout=open(root / "milvus.log", "ab"), stderr=subprocess.STDOUT,
                              start_new_session=True, cwd=Path(__file__).resolve().parents[1])
    state = {"milvus": {"port": milvus_port, "pid": milvus.pid}, "redis": {"port": redis_port, "pid": redis.pid}}
    (root / "stack.json").write_text(json.dumps(state, indent=2))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if milvus.poll() is not None or redis.poll() is not None:
            down(cfg)
            raise StackError(f"a stack process exited at start; see {root}/milvus.log and {root}/redis.log")
        s = status(cfg)
        if s["up"] and _milvus_ready(milvus_port):
            return s
        time.sleep(1)
    down(cfg)
    raise StackError(f"the stack did not answer within {timeout:.0f} s; see {root}/milvus.log")


def _milvus_ready(port: int) -> bool:
    from pymilvus import MilvusClient

    try:
        MilvusClient(uri=f"http://127.0.0.1:{port}", timeout=5).list_collections()
        return True
    except Exception:  # noqa: BLE001 - not ready yet
        return False


def down(cfg: Config) -> dict[str, Any]:
    """Stop both (SIGTERM, then SIGKILL after 30 s) and forget the stack."""
    path = stack_dir(cfg) / "stack.json"
    if not path.exists():
        return {"up": False}
    state = json.loads(path.read_text())
    for name in ("milvus", "redis"):
        pid = state.get(name, {}).get("pid")
        if _alive(pid):
            os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    for name in ("milvus", "redis"):
        pid = state.get(name, {}).get("pid")
        while _alive(pid) and time.monotonic() < deadline:
            _reap(pid)
            time.sleep(0.2)
        if _alive(pid):
            os.killpg(pid, signal.SIGKILL)
            _reap(pid)
    path.unlink()
    return {"up": False}


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _keep_milvus(base_dir: str, port: int) -> None:
    """The keeper: run Milvus standalone until SIGTERM, then stop it."""
    from milvus import default_server

    default_server.set_base_dir(base_dir)
    default_server.listen_port = port
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    default_server.start()
    print(f"milvus answering on 127.0.0.1:{port}", flush=True)
    try:
        while not stopping:
            time.sleep(0.5)
    finally:
        default_server.stop()


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "_keep_milvus":
    _keep_milvus(sys.argv[2], int(sys.argv[3]))
