"""The synthetic generator: determinism, raw layout, generative invariants, and a learnable signal."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.training.data.test_contracts import tiny_raw
from training.cli import main
from training.config import Config, ConfigError, DataConfig
from training.data import raw, synthetic
from training.data.contracts import validate_raw
from training.data.snapshot import raw_dir
from training.data.synthetic import GroundTruth, generate, load_world
from training.evaluation.metrics import recall_at_k
from training.evaluation.oracle import oracle_recall_at_k
from training.pipeline import continue_raw, make_raw

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
    # leaving the interest term out changes a score by the same amount for every pin of one interest
    diff = scores - truth.scores(users, terms=("popularity", "affinity"))
    for k in np.unique(truth.pin_interest):
        of_k = diff[:, truth.pin_interest == k]
        np.testing.assert_allclose(of_k, np.repeat(of_k[:, :1], of_k.shape[1], axis=1), atol=1e-4)
    with pytest.raises(ValueError, match="unknown score terms"):
        truth.scores(users, terms=("trend",))


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


# --- The world continued (`retrieval generate --continue --days N`) -----------------------------------------------

US_PER_DAY = 86_400_000_000


def _world_cfg(data_dir: Path, **data) -> Config:
    return Config(data_dir=str(data_dir), data=dataclasses.replace(SMALL, **data))


def _small_flags(data_dir: Path) -> list[str]:
    return ["--data_dir", str(data_dir), "--data.n_users", str(SMALL.n_users), "--data.n_pins", str(SMALL.n_pins),
            "--data.n_events", str(SMALL.n_events), "--data.seed", str(SMALL.seed)]


def _raw_bytes(cfg: Config) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(raw_dir(cfg).iterdir())}


@pytest.fixture(scope="module")
def continued(tmp_path_factory) -> tuple[Config, dict[str, bytes], dict[str, bytes]]:
    """A SMALL world, continued by 14 days through the CLI in two 7-day steps; its raw files before and after."""
    cfg = _world_cfg(tmp_path_factory.mktemp("continued"))
    assert main(["generate", *_small_flags(cfg.data_path)]) == 0
    before = _raw_bytes(cfg)
    for _ in range(2):
        assert main(["generate", "--continue", "--days", "7", *_small_flags(cfg.data_path)]) == 0
    return cfg, before, _raw_bytes(cfg)


def test_continuing_in_day_chunks_gives_identical_files(continued, tmp_path: Path) -> None:
    _, _, after = continued
    cfg = _world_cfg(tmp_path)
    make_raw(cfg)
    summary = continue_raw(cfg, 14)
    assert _raw_bytes(cfg) == after
    assert summary["to"] == "2026-11-15T00:00:00+00:00" and summary["events"] > 0 and summary["pins"] > 0


def test_the_replayed_world_is_the_generated_one(small: tuple[raw.RawTables, GroundTruth]) -> None:
    """Centroids and users' activity are not stored: the continuation replays the generator's first draws."""
    _, truth = small
    world = synthetic._make_world(np.random.Generator(np.random.PCG64(SMALL.seed)), SMALL)
    first_draw = np.random.Generator(np.random.PCG64(SMALL.seed)).normal(
        0.0, synthetic.CENTROID_STD, (SMALL.n_interests, synthetic.LATENT_DIM))
    np.testing.assert_array_equal(world.centroids, first_draw)
    np.testing.assert_array_equal(world.pins.v, truth.v)
    np.testing.assert_array_equal(world.users.theta, truth.theta)
    # v of an original = its interest's centroid + noise: the centroids are the ones the pins were drawn around
    original = truth.duplicate_of < 0
    noise = truth.v[original] - world.centroids[truth.pin_interest[original]]
    assert abs(noise.std() - synthetic.PIN_NOISE_STD) < 0.05 and abs(noise.mean()) < 0.05


def test_continuation_only_appends_after_the_old_end(continued) -> None:
    cfg, before, after = continued
    for name in ("users.parquet", "interests.parquet", "user_follows.parquet"):
        assert after[name] == before[name], name
    old, old_truth = generate(SMALL)
    tables, truth = load_world(raw_dir(cfg))
    for name in ("pins", "events"):
        new = getattr(tables, name)
        pd.testing.assert_frame_equal(new.iloc[: len(getattr(old, name))], getattr(old, name), check_dtype=False)
    ev = tables.events.iloc[len(old.events):]
    old_end = pd.Timestamp(SMALL.end_date, tz="UTC")
    assert ev["event_timestamp"].min() >= old_end
    assert ev["event_timestamp"].max() < old_end + pd.Timedelta(days=14)
    keys = tables.events[["event_timestamp", "user_id", "pin_id"]]
    assert keys.equals(keys.sort_values(["event_timestamp", "user_id", "pin_id"], kind="stable"))
    per_day = ev.groupby(ev["event_timestamp"].dt.floor("D")).size()
    history_end = pd.Timestamp(SMALL.end_date, tz="UTC")
    last_week = old.events["event_timestamp"] >= history_end - pd.Timedelta(days=7)
    rate = last_week.sum() / 7   # the volume of the history's last week (a day has its share, or one row less)
    assert len(per_day) == 14 and per_day.between(np.floor(rate) - 1, np.ceil(rate)).all()
    assert set(ev["event_type"]) == set(raw.EVENT_TYPES) and set(ev["surface"]) == set(raw.SURFACES)
    created = ev["pin_id"].map(tables.pins.set_index("pin_id")["created_at"])
    assert (ev["event_timestamp"] >= created).all()
    assert ev["user_id"].isin(old.users["user_id"]).all()
    assert truth.end_us == old_truth.end_us + 14 * US_PER_DAY


def test_new_pins_are_created_in_the_new_days_and_get_events(continued) -> None:
    cfg, _, _ = continued
    old, _ = generate(SMALL)
    tables, truth = load_world(raw_dir(cfg))
    new = tables.pins.iloc[len(old.pins):]
    old_end = pd.Timestamp(SMALL.end_date, tz="UTC")
    assert len(new) > 20 and new["pin_id"].min() > old.pins["pin_id"].max() and new["pin_id"].is_monotonic_increasing
    assert new["created_at"].between(old_end, old_end + pd.Timedelta(days=14), inclusive="left").all()
    assert new["created_at"].is_monotonic_increasing
    # near-duplicates copy an older original: same signature and interest, created later
    idx = np.searchsorted(truth.pin_ids, new["pin_id"].to_numpy())
    dup = truth.duplicate_of[idx] >= 0
    assert 0 < dup.sum() < len(new)
    pins = tables.pins.set_index("pin_id")
    copies, originals = new[dup].set_index("pin_id"), pins.loc[truth.duplicate_of[idx][dup]]
    assert (copies["image_signature"].to_numpy() == originals["image_signature"].to_numpy()).all()
    assert (copies["interest_id"].to_numpy() == originals["interest_id"].to_numpy()).all()
    assert (copies["created_at"].to_numpy() > originals["created_at"].to_numpy()).all()
    assert not new.loc[~dup, "image_signature"].isin(old.pins["image_signature"]).any()
    # new pins are shown and engaged with
    ev = tables.events.iloc[len(old.events):]
    shown = ev[ev["pin_id"].isin(new["pin_id"])]
    assert shown["pin_id"].nunique() > 0.5 * len(new)
    assert shown["event_type"].isin(POSITIVE).any()


def test_ground_truth_is_extended_and_the_trend_goes_on(continued, small: tuple[raw.RawTables, GroundTruth]) -> None:
    cfg, _, _ = continued
    old_tables, old = small
    tables, truth = load_world(raw_dir(cfg))
    np.testing.assert_array_equal(truth.pin_ids, tables.pins["pin_id"].to_numpy())
    n = len(old.pin_ids)
    for name in ("pin_ids", "v", "pin_interest", "popularity", "duplicate_of"):
        np.testing.assert_array_equal(getattr(truth, name)[:n], getattr(old, name), err_msg=name)
        assert len(getattr(truth, name)) == len(tables.pins), name
    for name in ("user_ids", "theta", "z", "dominant", "trend_amplitude", "trend_drift", "start_us"):
        np.testing.assert_array_equal(getattr(truth, name), getattr(old, name), err_msg=name)
    np.testing.assert_array_equal(truth.pin_interest, tables.pins["interest_id"].to_numpy())
    assert truth.trend_days == SMALL.days and truth.history_days == SMALL.days
    # new pins: positive Zipf weights no larger than rank 1's, all in interests that had pins
    s = SMALL.zipf_exponent
    assert (truth.popularity[n:] > 0).all() and truth.popularity[n:].max() <= 2 ** (1 - s) / (1 - s) - 1 / (1 - s)
    # the trend of the history is unchanged, and it goes on past the old end (sinusoid + drift, no jump)
    t = np.linspace(0, SMALL.days, 50)
    np.testing.assert_array_equal(truth.log_trend(t), old.log_trend(t))
    edge = truth.log_trend(np.array([SMALL.days - 1e-6, SMALL.days + 1e-6]))
    np.testing.assert_allclose(edge[0], edge[1], atol=1e-5)
    later = truth.trend_weights("2026-11-14T12:00")
    t_later = SMALL.days + 13.5
    expected = np.exp(truth.trend_amplitude * np.sin(2 * np.pi * t_later / truth.trend_period_days + truth.trend_phase)
                      + truth.trend_drift * (t_later / SMALL.days - 0.5))
    np.testing.assert_allclose(later, expected, rtol=1e-9)
    hours = (np.arange((SMALL.days + 14) * 24) + 0.5) / 24
    np.testing.assert_allclose(truth.trend_mean, np.exp(truth.log_trend(hours)).mean(axis=0), rtol=1e-12)
    # the oracle scores the continued world: trained on the history, tested on the new days
    train, _ = _temporal_split(old_tables.events, test_share=0.0)
    ev = tables.events.iloc[len(old_tables.events):]
    test = ev[ev["event_type"].isin(POSITIVE)]
    oracle = oracle_recall_at_k(truth, train, test, k=50)
    popularity = _popularity_recall_at_k(train, test, truth.pin_ids, k=50)
    assert oracle > popularity + 0.1, (oracle, popularity)


def test_continued_events_pass_the_contracts(continued, tmp_path: Path) -> None:
    cfg, _, _ = continued
    reports = validate_raw(raw_dir(cfg), tmp_path, cfg.contracts, now=datetime(2026, 11, 15, tzinfo=UTC))
    assert all(r.quarantined == 0 for r in reports.values()), reports


def test_an_interrupted_continuation_is_redone_identically(continued, tmp_path: Path) -> None:
    """The ground truth is written last: pins and events written past its end are leftovers, drawn again."""
    _, _, after = continued
    cfg = _world_cfg(tmp_path)
    make_raw(cfg)
    continue_raw(cfg, 7)
    truth_after_7 = (raw_dir(cfg) / "ground_truth.npz").read_bytes()
    continue_raw(cfg, 10)
    (raw_dir(cfg) / "ground_truth.npz").write_bytes(truth_after_7)   # killed before the ground truth was replaced
    continue_raw(cfg, 7)
    assert _raw_bytes(cfg) == after


def test_continuation_refuses_what_it_cannot_continue(continued, tmp_path: Path, capsys) -> None:
    cfg, _, after = continued
    with pytest.raises(ValueError, match="no synthetic world to continue .* no raw data"):
        continue_raw(_world_cfg(tmp_path / "empty"), 7)
    movielens = _world_cfg(tmp_path / "movielens")
    raw.write_raw(tiny_raw(400), raw_dir(movielens))
    with pytest.raises(ValueError, match="no synthetic world to continue .* MovieLens"):
        continue_raw(movielens, 7)
    for field, value in (("seed", SMALL.seed + 1), ("n_users", 301), ("n_events", 50_000), ("days", 90)):
        with pytest.raises(ValueError, match=rf"does not match the stored synthetic world.*data\.{field}|"
                                             rf"data\.{field}.* does not match the stored world"):
            continue_raw(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **{field: value})), 7)
    # the contract rejects timestamps more than contracts.max_future_days after the wall clock
    now = datetime(2026, 11, 16, 12, tzinfo=UTC)
    with pytest.raises(ValueError, match=r"contracts\.max_future_days=1"):
        continue_raw(cfg, 3, now=now)
    assert _raw_bytes(cfg) == after   # nothing written by a refusal
    far = dataclasses.replace(cfg, contracts=dataclasses.replace(cfg.contracts, max_future_days=30))
    assert continue_raw(far, 3, now=now)["to"] == "2026-11-18T00:00:00+00:00"
    assert main(["generate", "--days", "3", *_small_flags(cfg.data_path)]) == 2
    assert "--days goes with --continue" in capsys.readouterr().err
    assert main(["generate", "--continue", *_small_flags(cfg.data_path)]) == 2
    assert "--continue needs --days" in capsys.readouterr().err
