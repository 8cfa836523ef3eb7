"""``data.until``: the data stage cut at a date (MovieLens replay by time; the synthetic world too). Nothing at or after
it reaches a dbt model, the snapshot ends at or before it, and the snapshot id says which cut it is."""

from __future__ import annotations

from datetime import UTC, datetime

import duckdb
import pandas as pd
import pytest

from tests.conftest import small_config
from training.data import snapshot
from training.pipeline import make_raw

pytestmark = pytest.mark.slow

UNTIL = "2026-10-01"


def test_a_snapshot_cut_at_until_holds_nothing_at_or_after_it(tmp_path):
    cfg = small_config(tmp_path)
    make_raw(cfg)
    raw = snapshot.raw_dir(cfg)
    events = pd.read_parquet(raw / "events.parquet")
    until = pd.Timestamp(UNTIL, tz="UTC")
    full_as_of = events["event_timestamp"].max().floor("D") + pd.Timedelta(days=1)   # int_data_window without a cut
    assert (events["event_timestamp"] >= until).sum() > 0.1 * len(events)

    cut = small_config(tmp_path, until=UNTIL)
    assert snapshot.snapshot_id(cut) != snapshot.snapshot_id(cfg)
    assert snapshot.snapshot_id(cut) != snapshot.snapshot_id(small_config(tmp_path, until="2026-10-02"))
    snap = snapshot.build(cut)   # every dbt model, data test and unit test passed
    assert (cfg.data_path / "tmp" / "dbt-spill").is_dir()   # DuckDB's spill folder, made whole before dbt runs
    assert snap.manifest["config"]["until"] == "2026-10-01T00:00:00+00:00"
    assert snap.as_of <= datetime(2026, 10, 1, tzinfo=UTC) < full_as_of
    assert snap.as_of == datetime(2026, 10, 1, tzinfo=UTC)   # the synthetic history has events every day

    # the staging views as dbt compiled them, over the snapshot's staged inputs (the views name the build folder)
    compiled = cfg.data_path / "dbt" / "target" / "compiled" / "retrieval" / "models" / "staging"
    con = duckdb.connect()
    con.execute("set TimeZone = 'UTC'")

    def staged(model: str) -> pd.DataFrame:
        sql = (compiled / f"{model}.sql").read_text().replace(str(cfg.data_path / "build"), str(snap.path))
        assert "cast('2026-10-01T00:00:00+00:00' as timestamptz)" in sql, model
        return con.execute(sql).df()

    for model, column in (("stg_events", "event_timestamp"), ("stg_pins", "created_at"), ("stg_users", "signup_at"),
                          ("stg_user_follows", "followed_at")):
        raw_rows = pd.read_parquet(raw / f"{model[4:]}.parquet", columns=[column])[column]
        kept = staged(model)[column]
        assert len(kept) > 0 and kept.max() < until, model
        if model != "stg_user_follows":   # (follows are one row per user and interest)
            assert len(kept) == (raw_rows < until).sum(), model
        if model in ("stg_events", "stg_pins"):   # (users sign up before their first event: all before the cut)
            assert len(kept) < len(raw_rows), model
    with duckdb.connect(str(snap.path / "warehouse.duckdb"), read_only=True) as wh:
        assert pd.Timestamp(wh.execute("select last_event_at from int_data_window").fetchone()[0]) < until
    for table in ("fct_engagements", "fct_pretrain_engagements"):
        assert pd.read_parquet(snap.table(table), columns=["event_timestamp"])["event_timestamp"].max() < until, table
    for table in ("user_features", "pin_features", "user_sequence"):   # feature rows are stamped at day ends
        assert pd.read_parquet(snap.table(table), columns=["event_timestamp"])["event_timestamp"].max() <= until, table
    pins = pd.read_parquet(raw / "pins.parquet")
    late = pins.loc[pins["created_at"] >= until, "pin_id"]
    assert len(late) > 0
    for table in ("pin_profile", "serving_corpus", "pin_canonical_map"):
        assert not pd.read_parquet(snap.table(table))["pin_id"].isin(late).any(), table
