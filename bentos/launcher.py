"""``retrieval-service``: run the BentoML retrieval service (bentos/service.py) for a data dir.

    retrieval-service serve     ``bentoml serve`` in the foreground
    retrieval-service start     in the background (its own session), wait until ``/readyz`` reports the loaded
                                release, print an example request and return, leaving the service answering
                                (pids and the size-rotated log under ``<data_dir>/serve.{pid,log}``); refuses
                                when the port is taken
    retrieval-service stop      stop a service started with ``start``

Every action takes the config flags of ``retrieval`` (``--data_dir``, ``--serve.port``, ``--config FILE``...).
The effective config is written to ``<data_dir>/serve.config.yaml`` and handed to the service process as
``RETRIEVAL_CONFIG``, with ``BENTOML_HOME=<data_dir>/bentoml`` (the model store that ``release publish``
writes the user towers to).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from training import __version__
from training.config import CONFIG_ENV, REPO_ROOT, Config, ConfigError, add_config_flags, config_from_args
from training.io import atomic_write_text

SERVICE = "bentos.service:RetrievalService"
LOG_MAX_BYTES = 10 * 2**20
LOG_BACKUPS = 3
"""``<data_dir>/serve.log`` rotates at 10 MB, keeping 3 older files (bentos/logpipe.py)."""


class NotReadyError(RuntimeError):
    """The service did not answer /readyz with 200 in time (or its process ended)."""


def _paths(cfg: Config) -> tuple[Path, Path]:
    return cfg.data_path / "serve.pid", cfg.data_path / "serve.log"


def command(cfg: Config) -> tuple[list[str], dict[str, str]]:
    """The ``bentoml serve`` command line and environment of the service for ``cfg`` (whose effective config
    this writes to ``<data_dir>/serve.config.yaml``)."""
    config_file = cfg.data_path / "serve.config.yaml"
    atomic_write_text(config_file, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    bentoml = str(Path(sys.executable).parent / "bentoml")
    cmd = [bentoml, "serve", SERVICE, "--host", cfg.serve.host, "--port", str(cfg.serve.port)]
    env = {**os.environ, CONFIG_ENV: str(config_file), "BENTOML_HOME": str(cfg.bentoml_home),
           "BENTOML_DO_NOT_TRACK": "True"}
    return cmd, env


def get_json(url: str, timeout: float = 2.0) -> tuple[int, dict[str, Any]]:
    """(status, JSON body) of a GET; (0, {}) when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, {}
    except (urllib.error.URLError, OSError):
        return 0, {}


def wait_ready(base_url: str, timeout_s: float = 180.0, proc: subprocess.Popen | None = None,
               poll_s: float = 0.3) -> dict[str, Any]:
    """Poll ``<base_url>/readyz`` until it answers 200; returns its body. Raises ``NotReadyError`` when the
    deadline passes or ``proc`` (the server process, if given) ends first."""
    deadline = time.monotonic() + timeout_s
    while True:
        status, body = get_json(f"{base_url}/readyz")
        if status == 200:
            return body
        if proc is not None and proc.poll() is not None:
            raise NotReadyError(f"the service process exited with code {proc.returncode} before it was ready")
        if time.monotonic() > deadline:
            raise NotReadyError(f"{base_url}/readyz did not answer 200 within {timeout_s:.0f}s (last: {status})")
        time.sleep(poll_s)


def serve(cfg: Config) -> None:
    """``bentoml serve`` in the foreground (replaces this process)."""
    cmd, env = command(cfg)
    os.chdir(REPO_ROOT)
    os.execvpe(cmd[0], cmd, env)


def port_taken(host: str, port: int) -> bool:
    """True when something already listens on host:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _recorded_pids(cfg: Config) -> list[int]:
    """The live processes of the service ``start`` left running for this data dir (leader and workers)."""
    pid_file, _ = _paths(cfg)
    try:
        recorded = json.loads(pid_file.read_text())
        pids = [int(recorded["pid"]), *map(int, recorded.get("descendants", []))]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return _alive(pids)


def _held_by(pids: list[int], port: int) -> bool:
    """True when one of ``pids`` listens on ``port``."""
    import psutil

    for pid in pids:
        try:
            conns = psutil.Process(pid).net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port for c in conns):
            return True
    return False


def start(cfg: Config, timeout_s: float = 180.0) -> dict[str, Any]:
    """Start the service in the background and return once it is ready, replacing the one this data dir started
    before (an embedded Milvus database opens in one process only). Refuses, naming the port, when another process
    listens there, and then leaves the running service as it was: nothing is stopped unless the new one can bind."""
    if port_taken(cfg.serve.host, cfg.serve.port) and not _held_by(_recorded_pids(cfg), cfg.serve.port):
        raise RuntimeError(f"{cfg.serve.host}:{cfg.serve.port} is already in use by another process: stop it, or "
                           "choose another --serve.port (the service of this data dir, if any, still runs)")
    stop(cfg)
    if port_taken(cfg.serve.host, cfg.serve.port):
        raise RuntimeError(f"{cfg.serve.host}:{cfg.serve.port} is still in use after stopping this data dir's "
                           "service: choose another --serve.port")
    cmd, env = command(cfg)
    pid_file, log_file = _paths(cfg)
    piped = [sys.executable, "-m", "bentos.logpipe", str(log_file), str(LOG_MAX_BYTES), str(LOG_BACKUPS), "--", *cmd]
    proc = subprocess.Popen(piped, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    _record(pid_file, proc.pid)
    base = f"http://{cfg.serve.host}:{cfg.serve.port}"
    try:
        body = wait_ready(base, timeout_s, proc)
        if proc.poll() is not None:   # something else answered: our server is gone
            raise NotReadyError(f"the service process exited with code {proc.returncode}")
        _record(pid_file, proc.pid)   # now with its workers
    except NotReadyError as e:
        tail = log_file.read_text()[-2000:] if log_file.exists() else ""
        stop(cfg)
        raise RuntimeError(f"{e} (see {log_file}):\n{tail}") from e
    release = body["release"]
    example = (f"curl -s -X POST {base}/retrieve -H 'Content-Type: application/json' "
               f"-d '{{\"user_id\": {release.get('example_user_id') or 1}, \"k\": 10}}'")
    print(f"\nThe retrieval service is answering on {base} (release {release['model_version']}).\n"
          f"  {example}\n  OpenAPI: {base}/docs.json   log: {log_file}   stop: retrieval-service stop (or make stop)\n",
          file=sys.stderr)
    return {"url": base, "pid": proc.pid, "release": release["model_version"], "example": example}


def _record(pid_file: Path, pid: int) -> None:
    """Write the server's pid and every descendant's (its workers) to the pid file."""
    import psutil

    try:
        children = [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        children = []
    atomic_write_text(pid_file, json.dumps({"pid": pid, "descendants": children}))


def _alive(pids: list[int]) -> list[int]:
    """The pids still running (a zombie, or a process that exits while it is looked at, is not)."""
    import psutil

    def running(p: int) -> bool:
        try:
            return psutil.Process(p).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    return [p for p in pids if running(p)]


def stop(cfg: Config) -> dict[str, Any]:
    """Stop the service ``start`` left running for this data dir: its process group and every process it
    recorded (workers outlive a killed leader; they are stopped too). SIGTERM, then SIGKILL after 10 s."""
    pid_file, _ = _paths(cfg)
    if not pid_file.exists():
        return {"stopped": None}
    try:
        recorded = json.loads(pid_file.read_text())
        pid, pids = int(recorded["pid"]), [int(recorded["pid"]), *map(int, recorded.get("descendants", []))]
    except (ValueError, KeyError, TypeError):
        pid = int(pid_file.read_text().strip())
        pids = [pid]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        for p in _alive(pids):
            try:
                os.kill(p, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + (10 if sig == signal.SIGTERM else 5)
        while _alive(pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not _alive(pids):
            break
    pid_file.unlink(missing_ok=True)
    return {"stopped": pid}


ACTIONS = {"serve": "run the service in the foreground",
           "start": "start it in the background and wait until it is ready; refuses a port another process holds",
           "stop": "stop the service started with `start`"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="retrieval-service", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, text in ACTIONS.items():
        add_config_flags(sub.add_parser(name, help=text, description=text))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        if args.action == "serve":
            serve(cfg)
        result = start(cfg) if args.action == "start" else stop(cfg)
    except (ConfigError, RuntimeError) as e:
        print(f"retrieval-service {args.action}: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
