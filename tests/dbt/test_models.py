"""The dbt models on a real build, checked against independent pandas recomputations from the staged events."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from training.data.snapshot import load_live

pytestmark = pytest.mark.slow

WEIGHTS = {"closeup": 1.0, "click": 2.0, "save": 4.0, "hide": 0.0, "impression": 0.0}
POSITIVE = ("closeup", "click", "save")


@pytest.fixture(scope="module")
def live(pipeline_cfg):
    """The live snapshot, its Homefeed events (what labels and features are made of) and its pins."""
    snap, events, pins = _staged(pipeline_cfg)
    return snap, events[events["surface"] == "homefeed"], pins


def _staged(cfg):
    snap = load_live(cfg)
    staged = snap.path / "staged"
    return snap, pd.read_parquet(staged / "events.parquet"), pd.read_parquet(staged / "pins.parquet")


def _canonical(pins: pd.DataFrame) -> pd.Series:
    first = pins.sort_values(["created_at", "pin_id"]).groupby("image_signature")["pin_id"].first()
    return pins.set_index("pin_id")["image_signature"].map(first)


def test_build_ran_every_unit_test(pipeline_cfg, live):
    snap, _, _ = live
    unit_tests = {"canonical_pin_is_earliest_created_of_its_signature",
                  "engagements_drop_impressions_and_use_canonical_pins",
                  "same_instant_events_collapse_to_the_strongest", "decayed_engagement_halves_every_half_life",
                  "corpus_keeps_top_pins_by_decayed_engagement_inside_the_window",
                  "user_features_only_see_events_before_their_timestamp",
                  "user_sequence_holds_engagements_up_to_its_event_newest_first",
                  "labels_keep_homefeed_engagements_only", "pretrain_engagements_keep_positives_of_every_surface"}
    assert unit_tests <= set(snap.manifest["dbt_nodes"])


def test_canonical_map_matches_earliest_created_pin(live):
    snap, _, pins = live
    got = pd.read_parquet(snap.table("pin_canonical_map")).set_index("pin_id")["canonical_pin_id"].sort_index()
    expected = _canonical(pins).sort_index()
    assert got.to_dict() == expected.to_dict()
    assert (got != got.index).sum() > 0, "the synthetic data must contain near-duplicates"


def _engagements(events: pd.DataFrame, pins: pd.DataFrame) -> pd.DataFrame:
    """Engagement events with canonical pins and weights, ordered so the strongest event of an instant comes
    first (ties: alphabetical surface, as the dbt model breaks them)."""
    ev = events[events["event_type"] != "impression"]
    ev = ev.assign(pin_id=ev["pin_id"].map(_canonical(pins)), weight=ev["event_type"].map(WEIGHTS))
    return ev.sort_values(["weight", "surface"], ascending=[False, True], kind="stable")


KEY = ["user_id", "pin_id", "event_timestamp"]


def test_labels_equal_a_recomputation_from_homefeed_events(pipeline_cfg, live):
    snap, homefeed, pins = live
    _, events, _ = _staged(pipeline_cfg)
    other = events[(events["surface"] != "homefeed") & events["event_type"].isin(POSITIVE)]
    assert len(other) > 0.1 * len(events[events["event_type"].isin(POSITIVE)]), "the data must have other surfaces"
    strongest = _engagements(homefeed, pins).groupby(KEY, as_index=False).first()
    expected = strongest.assign(label=(strongest["weight"] > 0).astype("int64"))
    got = pd.read_parquet(snap.table("fct_engagements"))
    cols = [*KEY, "event_type", "weight", "label"]
    pd.testing.assert_frame_equal(got[cols].sort_values(KEY, ignore_index=True),
                                  expected[cols].sort_values(KEY, ignore_index=True), check_dtype=False)


def test_pretrain_engagements_equal_a_pandas_recomputation(pipeline_cfg):
    snap, events, pins = _staged(pipeline_cfg)
    positive = _engagements(events[events["event_type"].isin(POSITIVE)], pins)
    expected = positive.groupby(KEY, as_index=False).first()[[*KEY, "surface", "weight"]]
    got = pd.read_parquet(snap.table("fct_pretrain_engagements"))
    assert list(got.columns) == [*KEY, "surface", "weight"]
    pd.testing.assert_frame_equal(got.sort_values(KEY, ignore_index=True),
                                  expected.sort_values(KEY, ignore_index=True), check_dtype=False)
    assert set(got["surface"]) == {"homefeed", "search", "related"}
    labels = pd.read_parquet(snap.table("fct_engagements"))
    homefeed = got[got["surface"] == "homefeed"].merge(labels, on=KEY, how="left")
    assert (homefeed["label"] == 1).all(), "a Homefeed positive is a positive label too"
    assert len(got) > (labels["label"] == 1).sum()


def test_serving_corpus_equals_a_pandas_recomputation(pipeline_cfg, live):
    snap, events, pins = live
    t = pipeline_cfg.transform
    as_of = snap.as_of
    ev = events[events["event_type"].map(WEIGHTS) > 0].copy()
    ev["pin_id"] = ev["pin_id"].map(_canonical(pins))
    ev = ev[(ev["event_timestamp"] >= as_of - pd.Timedelta(days=t.corpus_window_days))
            & (ev["event_timestamp"] < as_of)]
    age = (pd.Timestamp(as_of) - ev["event_timestamp"]).dt.total_seconds() / 86400
    ev["decayed"] = ev["event_type"].map(WEIGHTS) * 0.5 ** (age / t.half_life_days)
    expected = ev.groupby("pin_id")["decayed"].sum().sort_values(ascending=False)
    corpus = pd.read_parquet(snap.table("serving_corpus")).set_index("pin_id")
    assert len(corpus) == min(len(expected), t.corpus_size)
    assert corpus["image_signature"].is_unique
    np.testing.assert_allclose(corpus["decayed_engagement"], expected.loc[corpus.index], rtol=1e-9)
    assert (corpus.sort_values("corpus_rank")["decayed_engagement"].diff().dropna() <= 0).all()


def test_pin_decay_at_each_day_equals_direct_sum(pipeline_cfg, live):
    snap, events, pins = live
    h = pipeline_cfg.transform.half_life_days
    decayed = pd.read_parquet(snap.table("pin_engagement_decayed"))
    ev = events.assign(pin_id=events["pin_id"].map(_canonical(pins)), w=events["event_type"].map(WEIGHTS))
    ev = ev[ev["w"] > 0]
    for row in decayed.sample(300, random_state=0).itertuples():
        mine = ev[(ev["pin_id"] == row.pin_id) & (ev["event_timestamp"] < row.event_timestamp)]
        age = (row.event_timestamp - mine["event_timestamp"]).dt.total_seconds() / 86400
        assert row.decayed_engagement == pytest.approx((mine["w"] * 0.5 ** (age / h)).sum(), rel=1e-9, abs=1e-12)


def test_user_window_counts_equal_direct_counts(live):
    snap, events, _ = live
    positive = events[events["event_type"].map(WEIGHTS) > 0]
    feats = pd.read_parquet(snap.table("user_features"))
    for row in feats.sample(300, random_state=0).itertuples():
        mine = positive[(positive["user_id"] == row.user_id) & (positive["event_timestamp"] < row.event_timestamp)]
        for days, col in ((7, "engagements_7d"), (30, "engagements_30d")):
            recent = mine[mine["event_timestamp"] >= row.event_timestamp - pd.Timedelta(days=days)]
            assert getattr(row, col) == len(recent), (row.user_id, col)
