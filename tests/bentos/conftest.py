"""A live release and a real `bentoml serve` on it, for the service tests."""

from __future__ import annotations

import dataclasses
import importlib
import os
import socket
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from bentos.launcher import start, stop
from tests.conftest import unpublished
from training.config import DATA_DIR_ENV
from training.release.publish import publish


def service_class(data_dir: str):
    """bentos.service's RetrievalService for ``data_dir``, imported afresh: the module reads its config at import
    (as `retrieval-service` does in its own process), and `bentoml build` may have imported it before with another."""
    os.environ[DATA_DIR_ENV] = data_dir
    sys.modules.pop("bentos.service", None)
    return importlib.import_module("bentos.service").RetrievalService


@contextmanager
def clients(url: str, user_ids, k: int = 20, timeout: float = 10) -> Iterator[list[tuple[int, dict]]]:
    """One thread per user id posting /retrieve in a loop until the block ends; yields the (status, body) list
    they fill."""
    import httpx

    results: list[tuple[int, dict]] = []
    done = threading.Event()

    def load(user_id: int) -> None:
        with httpx.Client(base_url=url, timeout=timeout) as c:
            while not done.is_set():
                r = c.post("/retrieve", json={"user_id": user_id, "k": k})
                results.append((r.status_code, r.json()))

    threads = [threading.Thread(target=load, args=(u,)) for u in user_ids]
    for t in threads:
        t.start()
    try:
        yield results
    finally:
        done.set()
        for t in threads:
            t.join()


@pytest.fixture(scope="module")
def live(pipeline_cfg, checkpoints):
    """The session's data dir with the first checkpoint published (and nothing else)."""
    cfg = unpublished(pipeline_cfg)
    publish(cfg, checkpoints[0])
    return cfg


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(live):
    """`bentoml serve` on loopback, started as `make run` starts it (`retrieval-service start`)."""
    cfg = dataclasses.replace(live, serve=dataclasses.replace(live.serve, port=free_port()))
    out = start(cfg)
    try:
        yield out["url"]
    finally:
        stop(cfg)
