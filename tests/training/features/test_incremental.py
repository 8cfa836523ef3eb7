"""A new snapshot that only adds newer data (a retrain's) is materialized incrementally: the online store writes
the new interval's rows, and offline/online parity still holds after it."""

from __future__ import annotations

import dataclasses

import duckdb
import pandas as pd
import pytest

from tests.conftest import small_config
from tests.training.features.test_feast import SERVICES, assert_online_equals_offline
from training import pipeline
from training.data.snapshot import load_live

pytestmark = pytest.mark.slow


def test_a_later_cut_materializes_only_the_new_interval_and_keeps_parity(tmp_path):
    full = small_config(tmp_path, n_events=20_000)
    pipeline.make_raw(full)
    early = dataclasses.replace(full, data=dataclasses.replace(full.data, until="2026-10-18"))
    pipeline.build(early)
    first = pipeline.features(early)
    assert first["mode"] == "full"
    before = load_live(early).as_of

    pipeline.build(full)   # the same lineage, two more weeks of data
    snap = load_live(full)
    assert snap.as_of > before
    second = pipeline.features(full)
    assert second["mode"] == "incremental"
    written = second["rows_written"]
    with duckdb.connect() as con:
        expected = con.execute(f"select count(*) from read_parquet('{snap.table('user_features')}') "
                               "where event_timestamp >= ?", [before + pd.Timedelta(seconds=1)]).fetchone()[0]
    assert written["user_features"] == expected > 0
    total = len(pd.read_parquet(snap.table("user_features")))
    assert written["user_features"] < total / 2, "an incremental materialize rewrote most of the table"
    for service, key, table in ((SERVICES[0], "user_id", "user_features"), (SERVICES[1], "pin_id", "pin_features")):
        assert_online_equals_offline(full, service, key, table)

    other = dataclasses.replace(full, transform=dataclasses.replace(full.transform, half_life_days=7.0))
    pipeline.build(other)   # other feature values for the same days: not a continuation
    assert pipeline.features(other)["mode"] == "full"
