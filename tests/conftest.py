"""Shared fixtures. The data stage runs for real (generator, pandera, dbt-duckdb, Feast) on small data,
once per test session, in a temporary data dir."""

from __future__ import annotations

import atexit
import os
import sys
from pathlib import Path

import pytest

from training.config import Config, DataConfig

SHARED = Path(__file__).resolve().parents[2] / "shared"
ML100K = SHARED / "datasets" / "ml-100k"

SMALL = dict(n_users=300, n_pins=900, n_events=40_000, n_interests=8, days=120, seed=3)


def small_config(data_dir: Path, **data) -> Config:
    return Config(data_dir=str(data_dir), data=DataConfig(**{**SMALL, **data}))


@pytest.fixture(scope="session")
def pipeline_cfg(tmp_path_factory) -> Config:
    """A data dir on which every data stage has run once (session-scoped: dbt + Feast are not free)."""
    from training.pipeline import run_data

    cfg = small_config(tmp_path_factory.mktemp("data"))
    os.environ["RETRIEVAL_DATA_DIR"] = cfg.data_dir
    run_data(cfg)
    return cfg


_exit_status = {"code": None}


def pytest_sessionfinish(session, exitstatus):
    _exit_status["code"] = int(exitstatus)


@atexit.register
def _exit_without_module_teardown() -> None:
    """Registered first, so it runs last, after every other exit handler: duckdb's bindings print
    spurious leak reports during module teardown once Feast has cached connections; skip that part so
    the pytest summary stays the last thing printed."""
    if _exit_status["code"] is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_status["code"])
