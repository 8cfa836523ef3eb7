"""Shared fixtures. The data stage runs for real (generator, pandera, dbt-duckdb, Feast) on small data,
once per test session, in a temporary data dir."""

from __future__ import annotations

import atexit
import dataclasses
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
    os.environ["BENTOML_HOME"] = str(cfg.bentoml_home)   # the one model store of this test session
    run_data(cfg)
    return cfg


@pytest.fixture(scope="session")
def checkpoints(pipeline_cfg) -> list[Path]:
    """One short real training run, plus two copies under other model versions (perturbed weights)."""
    from training.pretrain import pretrain_stage
    from training.train import train

    cfg = dataclasses.replace(pipeline_cfg, train=dataclasses.replace(pipeline_cfg.train, epochs=2, patience=2,
                                                                      batch_size=256, threads=1))
    pretrain_stage(cfg)
    return perturbed_copies(pipeline_cfg, Path(train(cfg)["checkpoint"]))


KEPT_AS_TRAINED = ("frequency", "blend", "pretrained.weight", "pretrained_users.weight")
"""State that ``perturbed_copies`` leaves alone: the logQ estimate, the blend weights chosen on validation (a tower
appends √w · table, so a weight of 0 nudged below zero is a NaN) and the frozen pre-trained tables."""


def perturbed_copies(cfg: Config, first: Path, n: int = 2) -> list[Path]:
    """``first`` plus ``n`` copies of it under other model versions (``<version>-v<i>``), every trained float
    weight moved by 0.01 · N(0, 1) (seeded), so that each version scores differently."""
    import torch

    payload = torch.load(first, weights_only=True)
    paths = [first]
    for i in range(1, n + 1):
        version = f"{payload['model_version']}-v{i}"
        out = cfg.data_path / "models" / version / "model.pt"
        out.parent.mkdir(parents=True, exist_ok=True)
        gen = torch.Generator().manual_seed(i)
        model = {k: v + 0.01 * torch.randn(v.shape, generator=gen)
                 if v.is_floating_point() and not any(s in k for s in KEPT_AS_TRAINED) else v
                 for k, v in payload["model"].items()}
        torch.save({**payload, "model_version": version, "model": model}, out)
        paths.append(out)
    return paths


def version_of(checkpoint: Path) -> str:
    return checkpoint.parent.name


def unpublished(cfg: Config) -> Config:
    """``cfg``'s data dir with no release: registry removed, every collection and user tower dropped."""
    import shutil

    from training.release.publish import recover

    shutil.rmtree(cfg.data_path / "releases", ignore_errors=True)
    recover(cfg)
    return dataclasses.replace(cfg, index=dataclasses.replace(cfg.index, verify_queries=60))


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
