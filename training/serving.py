"""Stage: run the BentoML retrieval service (bentos/service.py) for a data dir.

``retrieval serve`` runs ``bentoml serve`` in the foreground; ``--detach`` starts it in its own session,
waits until ``/readyz`` reports the loaded release, prints an example request and returns, leaving the
service answering (pid and log under ``<data_dir>/serve.{pid,log}``; ``retrieval stop`` ends it).
The service process gets ``RETRIEVAL_DATA_DIR`` and ``BENTOML_HOME=<data_dir>/bentoml`` (the model store
that ``release publish`` writes the user towers to).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from training.config import REPO_ROOT, Config
from training.release import bentoml_home

log = logging.getLogger(__name__)

SERVICE = "bentos/service.py:RetrievalService"


def _paths(cfg: Config) -> tuple[Path, Path]:
    return cfg.data_path / "serve.pid", cfg.data_path / "serve.log"


def command(cfg: Config) -> tuple[list[str], dict[str, str]]:
    bentoml = str(Path(sys.executable).parent / "bentoml")
    cmd = [bentoml, "serve", SERVICE, "--host", cfg.serve.host, "--port", str(cfg.serve.port)]
    env = {**os.environ, "RETRIEVAL_DATA_DIR": str(cfg.data_path), "BENTOML_HOME": str(bentoml_home(cfg)),
           "BENTOML_DO_NOT_TRACK": "True"}
    return cmd, env


def _get(url: str, timeout: float = 2.0) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, {}


def serve(cfg: Config, detach: bool = False, timeout_s: float = 180.0) -> dict[str, Any] | None:
    cmd, env = command(cfg)
    if not detach:
        os.chdir(REPO_ROOT)
        os.execvpe(cmd[0], cmd, env)
    stop(cfg)
    pid_file, log_file = _paths(cfg)
    with open(log_file, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    pid_file.write_text(str(proc.pid))
    base = f"http://{cfg.serve.host}:{cfg.serve.port}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            status, body = _get(f"{base}/readyz")
            if status == 200:
                break
        except (urllib.error.URLError, OSError):
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = log_file.read_text()[-2000:]
            stop(cfg)
            raise RuntimeError(f"the service did not become ready (see {log_file}):\n{tail}")
        time.sleep(0.5)
    example = (f"curl -s -X POST {base}/retrieve -H 'Content-Type: application/json' "
               f"-d '{{\"user_id\": {example_user(cfg)}, \"k\": 10}}'")
    print(f"\nThe retrieval service is answering on {base} (release {body['release']['model_version']}).\n"
          f"  {example}\n  OpenAPI: {base}/docs.json   log: {log_file}   stop: retrieval stop (or make stop)\n",
          file=sys.stderr)
    return {"url": base, "pid": proc.pid, "release": body["release"]["model_version"], "example": example}


def example_user(cfg: Config) -> int:
    """A user with engagement history in the live snapshot (for the printed example)."""
    import pandas as pd

    from training.data.snapshot import load_live

    seq = pd.read_parquet(load_live(cfg).table("user_sequence"), columns=["user_id", "history_length"])
    return int(seq.sort_values(["history_length", "user_id"], ascending=[False, True])["user_id"].iloc[0])


def stop(cfg: Config) -> dict[str, Any]:
    pid_file, _ = _paths(cfg)
    if not pid_file.exists():
        return {"stopped": None}
    pid = int(pid_file.read_text())
    try:
        os.killpg(pid, signal.SIGTERM)
        for _ in range(100):
            os.killpg(pid, 0)
            time.sleep(0.1)
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    pid_file.unlink(missing_ok=True)
    return {"stopped": pid}
