"""Feast on the real data stage: point-in-time correctness, offline/online parity, idempotence."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from feature_repo.feature_services import SERVICES_BY_ROLE
from training.data.snapshot import load_live
from training.features.store import feature_store
from training.features.training_set import training_set_path

SERVICES = (SERVICES_BY_ROLE["user"], SERVICES_BY_ROLE["pin"])

pytestmark = pytest.mark.slow


def _training_set(cfg) -> pd.DataFrame:
    return pd.read_parquet(training_set_path(cfg))


def test_training_set_has_one_row_per_label_and_its_manifest(pipeline_cfg):
    snap = load_live(pipeline_cfg)
    labels = pd.read_parquet(snap.table("fct_engagements"))
    ts = _training_set(pipeline_cfg)
    assert len(ts) == len(labels) > 1000
    manifest = json.loads(training_set_path(pipeline_cfg).with_suffix(".json").read_text())
    assert manifest["snapshot_id"] == snap.id and manifest["feature_services"] == SERVICES_BY_ROLE
    assert ts["age"].notna().all(), "the static profile must be joined for every label"
    assert ts["interest_id"].notna().all(), "the static pin profile must be joined for every label"
    assert ts["user_features_at"].notna().mean() > 0.8 and ts["pin_features_at"].notna().mean() > 0.8


def test_no_feature_is_newer_than_its_label(pipeline_cfg):
    ts = _training_set(pipeline_cfg)
    for col in ("user_features_at", "user_sequence_at", "pin_features_at"):
        seen = ts[col].notna()
        assert (ts.loc[seen, col] <= ts.loc[seen, "event_timestamp"]).all(), col


def test_recent_pins_are_exactly_the_engagements_before_the_label(pipeline_cfg):
    """Recompute every sampled label's history from the labels themselves: the sequence feature must be
    the user's positive engagements strictly before the label, newest first (fresh, and never itself)."""
    snap = load_live(pipeline_cfg)
    labels = pd.read_parquet(snap.table("fct_engagements"))
    history_length = pipeline_cfg.transform.history_length
    ts = _training_set(pipeline_cfg)
    positives = labels[labels["label"] == 1].sort_values(["event_timestamp", "pin_id"])
    by_user = dict(tuple(positives.groupby("user_id")))
    checked = 0
    for row in ts.sample(400, random_state=0).itertuples():
        hist = by_user.get(row.user_id, positives.iloc[:0])
        before = hist[hist["event_timestamp"] < row.event_timestamp]
        expected = list(before["pin_id"].to_numpy()[::-1][:history_length])
        got = [] if row.recent_pin_ids is None else list(row.recent_pin_ids)
        assert got == expected, (row.user_id, row.event_timestamp)
        checked += bool(expected)
    assert checked > 300


def _online(cfg, service: str, key: str, ids) -> pd.DataFrame:
    return feature_store(cfg).online_frame(service, key, ids)


def _missing(v) -> bool:
    return v is None or v is pd.NaT or (np.isscalar(v) and pd.isna(v))


def _same(a, b) -> bool:
    if _missing(a):
        return _missing(b)
    if isinstance(a, (list, np.ndarray)):
        return b is not None and list(a) == list(b)
    if isinstance(a, pd.Timestamp) or isinstance(b, pd.Timestamp):
        return pd.Timestamp(a).tz_convert("UTC") == pd.Timestamp(b).tz_convert("UTC")
    return a == b


@pytest.mark.parametrize("service,key,table", [(SERVICES[0], "user_id", "user_features"),
                                               (SERVICES[1], "pin_id", "pin_features")])
def test_online_values_equal_latest_offline_values(pipeline_cfg, service, key, table):
    assert_online_equals_offline(pipeline_cfg, service, key, table)


def assert_online_equals_offline(cfg, service: str, key: str, table: str) -> None:
    """150 sampled entities: the online store's values are the offline store's latest ones (also used by the
    server tier against Redis)."""
    pipeline_cfg = cfg
    snap = load_live(pipeline_cfg)
    ids = pd.read_parquet(snap.table(table))[key].drop_duplicates().sort_values()
    ids = ids.sample(150, random_state=1).sort_values()   # the same ids whatever the table's row order
    keys = pd.DataFrame({key: ids.to_numpy()})
    offline = feature_store(pipeline_cfg).historical(keys.assign(event_timestamp=snap.as_of), service)
    offline = offline.set_index(key).loc[ids]
    online = _online(pipeline_cfg, service, key, ids).set_index(key).loc[ids]
    features = [c for c in online.columns]
    assert set(features) <= set(offline.columns) and len(features) >= 3
    mismatches = [(i, f, offline.at[i, f], online.at[i, f]) for i in ids for f in features
                  if not _same(offline.at[i, f], online.at[i, f])]
    assert not mismatches, mismatches[:5]
    assert online[features].notna().any(axis=1).all()


def test_rerun_on_the_same_input_is_idempotent(pipeline_cfg):
    from training.pipeline import run_data

    before = load_live(pipeline_cfg)
    ts_before = _training_set(pipeline_cfg)
    sample = pd.read_parquet(before.table("user_features"))["user_id"].drop_duplicates().head(50)
    online_before = _online(pipeline_cfg, SERVICES[0], "user_id", sample)

    run_data(pipeline_cfg)

    after = load_live(pipeline_cfg)
    assert after.id == before.id and after.path != before.path and before.path.exists()
    for name in ("fct_engagements", "serving_corpus", "pin_canonical_map", "pin_engagement_decayed",
                 "user_profile", "user_sequence", "user_features", "user_impressions", "pin_profile", "pin_features"):
        a, b = (pd.read_parquet(s.table(name)) for s in (before, after))
        cols = [c for c in a.columns if a[c].dtype != object or isinstance(a[c].iloc[0], str)]
        pd.testing.assert_frame_equal(a.sort_values(cols).reset_index(drop=True),
                                      b.sort_values(cols).reset_index(drop=True), obj=name)
    pd.testing.assert_frame_equal(ts_before, _training_set(pipeline_cfg))
    pd.testing.assert_frame_equal(online_before, _online(pipeline_cfg, SERVICES[0], "user_id", sample))
    # the online store already held this snapshot: the rerun materialized incrementally
    assert feature_store(pipeline_cfg).materialize(after.as_of, after.id)["mode"] == "incremental"


def test_point_in_time_join_in_chunks_equals_one_call(pipeline_cfg):
    """``features.historical_chunk_rows`` bounds each Feast call (its DuckDB join spills at ~750k labels): the
    chunked join returns exactly the rows of one call."""
    from dataclasses import replace

    from training.features.store import Features
    from training.features.training_set import LABEL_COLUMNS

    labels = pd.read_parquet(load_live(pipeline_cfg).table("fct_engagements"), columns=LABEL_COLUMNS)
    labels = labels.sample(3000, random_state=0)
    whole = feature_store(pipeline_cfg).historical(labels, *SERVICES)
    small = replace(pipeline_cfg, features=replace(pipeline_cfg.features, historical_chunk_rows=700))
    chunked = Features(small).historical(labels, *SERVICES)
    keys = ["user_id", "pin_id", "event_timestamp"]
    a, b = (d.sort_values(keys).reset_index(drop=True) for d in (whole, chunked))
    assert len(b) == 3000 and list(a.columns) == list(b.columns)
    for col in a.columns:
        assert all(_same(x, y) for x, y in zip(a[col], b[col], strict=True)), col


def test_training_set_written_part_by_part_equals_one_part(pipeline_cfg):
    """The training set is joined and written one part of ``features.historical_chunk_rows`` labels at a time (a
    row group each), so the stage never holds all of it: the file equals the one a single part writes, row for
    row and in the same order, and a failed build leaves the previous file in place."""
    from dataclasses import replace

    import pyarrow.parquet as pq

    from training.features.training_set import build_training_set

    def built(chunk: int) -> tuple[pd.DataFrame, int, dict]:
        cfg = replace(pipeline_cfg, features=replace(pipeline_cfg.features, historical_chunk_rows=chunk,
                                                     incremental_training_set=False))
        manifest = build_training_set(cfg)
        path = training_set_path(cfg)
        return pd.read_parquet(path), pq.ParquetFile(path).num_row_groups, manifest

    whole, groups_whole, m_whole = built(10**9)
    parts, groups_parts, m_parts = built(997)
    assert groups_whole == 1 and groups_parts == -(-len(whole) // 997) > 1
    pd.testing.assert_frame_equal(whole, parts)
    assert {k: v for k, v in m_whole.items() if k != "seconds"} == {k: v for k, v in m_parts.items() if k != "seconds"}
