"""A new snapshot that only adds newer data (a retrain's) is materialized incrementally: the online store writes
the new interval's rows, and offline/online parity still holds after it; the training set joins only the new labels
and equals a whole rebuild."""

from __future__ import annotations

import dataclasses

import duckdb
import pandas as pd
import pytest

from tests.conftest import small_config
from tests.training.features.test_feast import SERVICES, assert_online_equals_offline
from training import pipeline
from training.data.snapshot import load_live
from training.features.training_set import training_set_path

pytestmark = pytest.mark.slow


def test_a_later_cut_materializes_only_the_new_interval_and_keeps_parity(tmp_path):
    full = small_config(tmp_path, n_events=20_000)
    pipeline.make_raw(full)
    early = dataclasses.replace(full, data=dataclasses.replace(full.data, until="2026-10-18"))
    pipeline.build(early)
    first = pipeline.features(early)
    assert first["mode"] == "full"
    assert pipeline.training_set(early)["mode"] == "full"
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

    appended = pipeline.training_set(full)
    kept = appended["rows"] - appended["joined_rows"]
    assert appended["mode"] == "incremental" and 0 < appended["joined_rows"] < kept, appended
    incremental = pd.read_parquet(training_set_path(full))
    rebuilt = pipeline.training_set(dataclasses.replace(
        full, features=dataclasses.replace(full.features, incremental_training_set=False)))
    assert rebuilt["mode"] == "full"
    pd.testing.assert_frame_equal(incremental, pd.read_parquet(training_set_path(full)))
    same = ("rows", "positives", "labels_end", "labels_digest", "snapshot_id", "interest_ids")
    assert {k: appended[k] for k in same} == {k: rebuilt[k] for k in same}
    assert pipeline.training_set(full)["joined_rows"] == 0   # nothing new: every row kept

    events_path = full.data_path / "raw" / "events.parquet"   # an old event's surface edited: labels unchanged,
    events = pd.read_parquet(events_path)                     # the history not
    old = events.index[events["event_timestamp"] < before][0]
    events.loc[old, "surface"] = "search" if events.loc[old, "surface"] != "search" else "related"
    events.to_parquet(events_path, index=False)
    pipeline.build(full)
    pipeline.features(full)
    edited = pipeline.training_set(full)
    assert edited["mode"] == "full" and "staged data" in edited["why"], edited["why"]

    other = dataclasses.replace(full, transform=dataclasses.replace(full.transform, half_life_days=7.0))
    pipeline.build(other)   # other feature values for the same days: not a continuation
    assert pipeline.features(other)["mode"] == "full"
    assert pipeline.training_set(other)["mode"] == "full"
