"""dbt under ``transform.memory_gib``: a build that must spill to disk finishes (DuckDB's spill folder is given once,
when dbt opens the database, and made whole first)."""

from __future__ import annotations

import dataclasses

import pytest

from tests.conftest import small_config
from training.data import snapshot
from training.pipeline import make_raw

pytestmark = pytest.mark.slow


def test_a_build_under_a_memory_limit_it_must_spill_past_finishes(tmp_path):
    cfg = small_config(tmp_path, n_events=200_000)
    cfg = dataclasses.replace(cfg, transform=dataclasses.replace(cfg.transform, memory_gib=0.06))
    make_raw(cfg)
    snap = snapshot.build(cfg)   # every model and test passed within 60 MiB
    assert snap.manifest["rows"]["fct_engagements"] > 0
    assert (cfg.data_path / "tmp" / "dbt-spill").is_dir()
