"""A live release and a real `bentoml serve` on it, for the service tests."""

from __future__ import annotations

import dataclasses
import importlib
import os
import socket
import sys

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
