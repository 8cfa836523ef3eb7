"""Shared fixtures. The data stage runs for real (generator, pandera, dbt-duckdb, Feast) on small data,
once per test session, in a temporary data dir."""

from __future__ import annotations

import os
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
