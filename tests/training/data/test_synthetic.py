"""The synthetic generator: determinism, raw layout, generative invariants, and a learnable signal."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from training.config import ConfigError, DataConfig
from training.data import raw
from training.data.synthetic import GroundTruth, generate
from training.evaluation.metrics import recall_at_k
from training.evaluation.oracle import oracle_recall_at_k

SMALL = DataConfig(n_users=300, n_pins=800, n_events=60_000, seed=11)
POSITIVE = ("closeup", "click", "save")


@pytest.fixture(scope="module")
def small() -> tuple[raw.RawTables, GroundTruth]:
    return generate(SMALL)


def _temporal_split(events: pd.DataFrame, test_share: float = 0.2) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per user, the last ``test_share`` of positive interactions (by time) are the test set."""
    pos = events[events["event_type"].isin(POSITIVE)]
    position = pos.groupby("user_id").cumcount()
    size = pos.groupby("user_id")["pin_id"].transform("size")
    is_test = position >= np.floor((1 - test_share) * size)
    return pos[~is_test], pos[is_test]


def _popularity_recall_at_k(train: pd.DataFrame, test: pd.DataFrame, all_pins: np.ndarray, k: int) -> float:
    """Recall@k of the global most-engaged pins, with the same exclusions as the oracle."""
    counts = train["pin_id"].value_counts()
    ranked = np.concatenate([counts.index.to_numpy(), np.setdiff1d(all_pins, counts.index.to_numpy())])
    seen = train.groupby("user_id")["pin_id"].agg(set)
    topk, relevant = [], []
    for user, pins in test.groupby("user_id")["pin_id"].agg(set).items():
        rel = pins - seen.get(user, set())
        if rel:
            topk.append([p for p in ranked.tolist() if p not in seen.get(user, set())][:k])
            relevant.append(rel)
    return recall_at_k(np.array(topk), relevant)


def test_same_seed_gives_identical_tables_and_files(small: tuple[raw.RawTables, GroundTruth], tmp_path: Path) -> None:
    again, truth_again = generate(SMALL)
    for name, df in small[0].frames().items():
        pd.testing.assert_frame_equal(df, again.frames()[name])
    for f in dataclasses.fields(GroundTruth):
        np.testing.assert_array_equal(getattr(small[1], f.name), getattr(truth_again, f.name))
    raw.write_raw(small[0], tmp_path / "a")
    raw.write_raw(again, tmp_path / "b")
    for name in raw.TABLES:
        assert (tmp_path / "a" / f"{name}.parquet").read_bytes() == (tmp_path / "b" / f"{name}.parquet").read_bytes()


def test_different_seed_gives_different_data(small: tuple[raw.RawTables, GroundTruth]) -> None:
    other, _ = generate(dataclasses.replace(SMALL, seed=SMALL.seed + 1))
    assert not small[0].events.equals(other.events)
    assert not small[0].pins.equals(other.pins)


def test_tables_match_the_raw_schemas(small: tuple[raw.RawTables, GroundTruth]) -> None:
    tables, _ = small
    for name, df in tables.frames().items():
        table = raw.to_arrow(name, df)
        assert table.schema == raw.SCHEMAS[name], name
        assert table.num_rows == len(df) > 0
        assert all(table.column(c).null_count == 0 for c in table.column_names), name
    assert tables.users["user_id"].is_unique and tables.pins["pin_id"].is_unique
    assert tables.users["age"].between(13, 80).all()
    assert set(tables.users["gender"]) <= {"f", "m", "u"}
    assert 5 <= tables.users["segment"].nunique() <= 12
    assert list(tables.interests["interest_id"]) == list(range(SMALL.n_interests))
    assert tables.pins["image_signature"].str.fullmatch(r"[0-9a-f]{16}").all()


def test_events_count_order_types_and_times(small: tuple[raw.RawTables, GroundTruth]) -> None:
    tables, truth = small
    ev = tables.events
    assert abs(len(ev) - SMALL.n_events) <= 0.1 * SMALL.n_events
    assert set(ev["event_type"]) == set(raw.EVENT_TYPES)
    keys = ev[["event_timestamp", "user_id", "pin_id"]]
    assert keys.equals(keys.sort_values(["event_timestamp", "user_id", "pin_id"], kind="stable"))
    start, end = pd.Timestamp(truth.start_us, unit="us", tz="UTC"), pd.Timestamp(SMALL.end_date, tz="UTC")
    assert ev["event_timestamp"].min() >= start and ev["event_timestamp"].max() < end
    created = ev["pin_id"].map(tables.pins.set_index("pin_id")["created_at"])
    assert (ev["event_timestamp"] >= created).all()
    first = ev.groupby("user_id")["event_timestamp"].min()
    signup = tables.users.set_index("user_id")["signup_at"].reindex(first.index)
    assert (signup < first).all()
    # Every engagement follows an impression of the same (user, pin) by 1 to 30 seconds.
    impressions = ev[ev["event_type"] == "impression"]
    engaged = ev[ev["event_type"] != "impression"]
    assert len(impressions) > len(engaged) > 0.1 * len(impressions)
    pairs = pd.merge_asof(
        engaged.sort_values("event_timestamp"),
        impressions.sort_values("event_timestamp"),
        on="event_timestamp",
        by=["user_id", "pin_id", "surface"],  # an engagement is on its impression's surface
        tolerance=pd.Timedelta(seconds=30),
        allow_exact_matches=False,
        suffixes=("", "_impression"),
    )
    assert pairs["event_type_impression"].notna().all()


def test_other_surfaces_get_their_share_of_impressions(small: tuple[raw.RawTables, GroundTruth]) -> None:
    ev = small[0].events
    assert set(ev["surface"]) == set(raw.SURFACES)
    share = ev.loc[ev["event_type"] == "impression", "surface"].value_counts(normalize=True)
    assert SMALL.other_surface_share == 0.25
    assert abs(1 - share["homefeed"] - SMALL.other_surface_share) < 0.02, share
    for surface in ("search", "related"):
        assert abs(share[surface] - SMALL.other_surface_share / 2) < 0.02, share
    assert (ev["surface"] == "homefeed").mean() > 0.5


def test_the_share_only_relabels_impressions(small: tuple[raw.RawTables, GroundTruth]) -> None:
    """The surface has its own random stream: any share gives the same events and ground truth, and a larger
    share only moves Homefeed events to the other surfaces."""
    tables, truth = small
    keys = ["user_id", "pin_id", "event_type", "event_timestamp"]
    none, truth_none = generate(dataclasses.replace(SMALL, other_surface_share=0.0))
    more, _ = generate(dataclasses.replace(SMALL, other_surface_share=0.45))
    assert (none.events["surface"] == "homefeed").all()
    for other in (none, more):
        pd.testing.assert_frame_equal(other.events[keys], tables.events[keys])
    for f in dataclasses.fields(GroundTruth):
        np.testing.assert_array_equal(getattr(truth_none, f.name), getattr(truth, f.name), err_msg=f.name)
    moved = tables.events["surface"] != more.events["surface"]
    assert moved.any() and (tables.events.loc[moved, "surface"] == "homefeed").all()
    assert (more.events["surface"] != "homefeed").mean() == pytest.approx(0.45, abs=0.02)


def test_other_surface_engagements_follow_the_same_tastes(small: tuple[raw.RawTables, GroundTruth]) -> None:
    tables, truth = small
    ev = tables.events[tables.events["event_type"].isin(POSITIVE)]
    u = np.searchsorted(truth.user_ids, ev["user_id"].to_numpy())
    p = np.searchsorted(truth.pin_ids, ev["pin_id"].to_numpy())
    affinity = pd.Series(np.einsum("ij,ij->i", truth.z[u], truth.v[p]), index=ev.index).groupby(ev["surface"]).mean()
    rng = np.random.default_rng(0)
    pairs = rng.integers(0, len(truth.user_ids), 20_000), rng.integers(0, len(truth.pin_ids), 20_000)
    random = np.einsum("ij,ij->i", truth.z[pairs[0]], truth.v[pairs[1]]).mean()
    for surface in ("search", "related"):
        assert affinity[surface] > random + 0.2, affinity
        assert abs(affinity[surface] - affinity["homefeed"]) < 0.1, affinity


@pytest.mark.parametrize("share", [-0.1, 0.5, 1.5])
def test_other_surface_share_is_checked(share: float) -> None:
    with pytest.raises(ConfigError, match=r"data\.other_surface_share"):
        DataConfig(other_surface_share=share)


def test_near_duplicates_share_signature_and_come_later(small: tuple[raw.RawTables, GroundTruth]) -> None:
    tables, truth = small
    pins = tables.pins.set_index("pin_id")
    dup = truth.duplicate_of >= 0
    assert dup.sum() == round(SMALL.duplicate_fraction * SMALL.n_pins)
    copies, originals = pins.loc[truth.pin_ids[dup]], pins.loc[truth.duplicate_of[dup]]
    assert (copies["image_signature"].to_numpy() == originals["image_signature"].to_numpy()).all()
    assert (copies["interest_id"].to_numpy() == originals["interest_id"].to_numpy()).all()
    assert (copies["created_at"].to_numpy() > originals["created_at"].to_numpy()).all()
    original_v = truth.v[np.searchsorted(truth.pin_ids, truth.duplicate_of[dup])]
    assert np.abs(truth.v[dup] - original_v).max() < 0.5
    assert pins["image_signature"].nunique() == (~dup).sum()


def test_impressions_follow_the_user_interest_mixture(small: tuple[raw.RawTables, GroundTruth]) -> None:
    tables, truth = small
    ev = tables.events[tables.events["event_type"] == "impression"]
    u = np.searchsorted(truth.user_ids, ev["user_id"].to_numpy())
    k = truth.pin_interest[np.searchsorted(truth.pin_ids, ev["pin_id"].to_numpy())]
    # Mass θ puts on the interests actually shown, versus on a random interest (1/K).
    assert truth.theta[u, k].mean() > 6.0 / SMALL.n_interests


def test_ground_truth_roundtrip_and_scores(small: tuple[raw.RawTables, GroundTruth], tmp_path: Path) -> None:
    _, truth = small
    path = tmp_path / "truth.npz"
    truth.save(path)
    loaded = GroundTruth.load(path)
    for f in dataclasses.fields(GroundTruth):
        np.testing.assert_array_equal(getattr(loaded, f.name), getattr(truth, f.name), err_msg=f.name)
    users = truth.user_ids[:5]
    scores = loaded.scores(users)
    assert scores.shape == (5, SMALL.n_pins) and scores.dtype == np.float32
    np.testing.assert_array_equal(scores, truth.scores(users))
    assert np.isfinite(scores).all()
    at = loaded.scores(users, at=SMALL.end_date)
    assert at.shape == scores.shape and not np.array_equal(at, scores)
    with pytest.raises(ValueError, match="unknown"):
        truth.scores(np.array([-1]))


def test_follows_are_deterministic_valid_and_follow_the_dominant_interests(
        small: tuple[raw.RawTables, GroundTruth]) -> None:
    tables, truth = small
    follows = tables.user_follows
    pd.testing.assert_frame_equal(follows, generate(SMALL)[0].user_follows)
    assert follows["user_id"].isin(tables.users["user_id"]).all()
    assert follows["interest_id"].isin(tables.interests["interest_id"]).all()
    assert not follows.duplicated(["user_id", "interest_id"]).any()
    signup = follows["user_id"].map(tables.users.set_index("user_id")["signup_at"])
    assert (follows["followed_at"] >= signup).all()
    assert (follows["followed_at"] < pd.Timestamp(SMALL.end_date, tz="UTC")).all()
    assert truth.n_dominant.min() >= 1 and truth.n_dominant.max() <= 5
    u = np.searchsorted(truth.user_ids, follows["user_id"].to_numpy())
    on_dominant = truth.dominant[u, follows["interest_id"].to_numpy()]
    # ~0.7 of each dominant interest is followed, ~0.2 of users follow one other interest
    assert on_dominant.sum() / truth.dominant.sum() == pytest.approx(0.7, abs=0.06)
    assert (~on_dominant).sum() / len(truth.user_ids) == pytest.approx(0.2, abs=0.06)


def test_follows_do_not_change_the_other_tables() -> None:
    """The follows come from their own random stream: the events of a seed are what they were before."""
    from training.data import synthetic

    tables, _ = generate(SMALL)
    keep = synthetic.FOLLOW_DOMINANT
    try:
        synthetic.FOLLOW_DOMINANT = 0.1
        other, _ = generate(SMALL)
    finally:
        synthetic.FOLLOW_DOMINANT = keep
    assert len(other.user_follows) < len(tables.user_follows)
    for name in raw.TABLES:
        pd.testing.assert_frame_equal(getattr(tables, name), getattr(other, name))


def test_ground_truth_without_dominant_loads(small: tuple[raw.RawTables, GroundTruth], tmp_path: Path) -> None:
    truth = dataclasses.replace(small[1], dominant=None)
    truth.save(tmp_path / "old.npz")
    loaded = GroundTruth.load(tmp_path / "old.npz")
    assert loaded.dominant is None
    with pytest.raises(ValueError, match="regenerate"):
        _ = loaded.n_dominant


def test_oracle_beats_popularity_on_a_temporal_split(small: tuple[raw.RawTables, GroundTruth]) -> None:
    tables, truth = small
    train, test = _temporal_split(tables.events)
    oracle = oracle_recall_at_k(truth, train, test, k=50)
    popularity = _popularity_recall_at_k(train, test, truth.pin_ids, k=50)
    assert oracle > popularity + 0.25 and oracle > 2 * popularity, (oracle, popularity)


def test_recall_at_k_by_hand() -> None:
    topk = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    # 1 of {1, 10}; 0 of {11}; 3 of {7, 8, 9, 12} (denominator is |relevant|, not min(k, |relevant|)).
    assert recall_at_k(topk, [{1, 10}, {11}, [7, 8, 9, 12]]) == pytest.approx((0.5 + 0.0 + 0.75) / 3)
    with pytest.raises(ValueError, match="relevant"):
        recall_at_k(topk, [{1}, set(), {2}])
    with pytest.raises(ValueError, match="rows"):
        recall_at_k(topk, [{1}])
