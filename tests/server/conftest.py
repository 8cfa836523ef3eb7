"""The server tier: a real Milvus server (HNSW, aliases) and Redis, started by `retrieval stack up` for the
session. Without them (`make server-deps` and `apt-get install redis-server`), every test here is skipped with
the reason."""

from __future__ import annotations

import dataclasses

import pytest

from tests.conftest import small_config
from training import stack
from training.config import Config, FeatureConfig, IndexConfig


@pytest.fixture(scope="session")
def stack_state(tmp_path_factory):
    missing = {k: v for k, v in stack.available().items() if v}
    if missing:
        pytest.skip("server tier skipped: " + "; ".join(f"{k}: {v}" for k, v in missing.items()))
    cfg = Config(data_dir=str(tmp_path_factory.mktemp("stack")))
    state = stack.up(cfg)
    yield state
    stack.down(cfg)


@pytest.fixture(scope="session")
def server_cfg(stack_state, pipeline_cfg, tmp_path_factory) -> Config:
    """A data dir whose index lives on the Milvus server (HNSW) and whose online store is Redis, with the data
    stages run and a short model trained. It shares the session's BentoML model store, which ``pipeline_cfg``
    sets up (BentoML keeps the first store a process opens, so the tier must not open its own first)."""
    import os

    from training.pipeline import run_data
    from training.pretrain import pretrain_stage

    o = stack.overrides(stack_state)
    cfg = small_config(tmp_path_factory.mktemp("server-data"))
    cfg.bentoml_home.symlink_to(os.environ["BENTOML_HOME"], target_is_directory=True)   # tests/conftest.py
    cfg = dataclasses.replace(cfg, index=IndexConfig(**o["index"]),
                              features=FeatureConfig(**o["features"]),
                              train=dataclasses.replace(cfg.train, epochs=2, patience=2, batch_size=256, threads=1))
    run_data(cfg)
    pretrain_stage(cfg)
    return cfg
