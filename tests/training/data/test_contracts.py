"""pandera contracts on raw inputs: quarantine with reasons, counts add up, clear errors."""

import logging
from datetime import UTC, datetime

import pandas as pd
import pytest

from training.config import ContractConfig
from training.data.contracts import ContractError, validate_raw
from training.data.raw import SURFACES, RawTables, write_raw

NOW = datetime(2026, 11, 21, tzinfo=UTC)
T0 = pd.Timestamp("2026-06-01", tz="UTC")


def tiny_raw(n_events: int = 200) -> RawTables:
    users = pd.DataFrame({"user_id": [1, 2, 3], "age": [20, 30, 40], "gender": ["f", "m", "u"],
                          "segment": ["a", "b", "a"], "signup_at": [T0] * 3})
    interests = pd.DataFrame({"interest_id": [0, 1], "name": ["art", "food"]})
    pins = pd.DataFrame({"pin_id": [10, 11, 12], "interest_id": [0, 1, 1], "image_signature": ["x", "y", "y"],
                         "created_at": [T0] * 3})
    events = pd.DataFrame({
        "user_id": [1 + i % 3 for i in range(n_events)],
        "pin_id": [10 + i % 3 for i in range(n_events)],
        "event_type": ["impression", "save", "click", "hide"] * (n_events // 4),
        "event_timestamp": [T0 + pd.Timedelta(hours=i) for i in range(n_events)],
        "surface": [SURFACES[i % len(SURFACES)] for i in range(n_events)],
    })
    return RawTables(users, interests, pins, events)


def run(tmp_path, tables: RawTables, **cfg):
    raw = tmp_path / "raw"
    write_raw(tables, raw)
    return validate_raw(raw, tmp_path / "build", ContractConfig(**cfg), now=NOW)


def write_events(tmp_path, events: pd.DataFrame) -> None:
    events.to_parquet(tmp_path / "raw" / "events.parquet")


def test_clean_input_is_accepted_whole(tmp_path):
    reports = run(tmp_path, tiny_raw())
    assert {t: (r.accepted, r.quarantined) for t, r in reports.items()} == {
        "interests": (2, 0), "users": (3, 0), "pins": (3, 0), "events": (200, 0)}
    staged = pd.read_parquet(tmp_path / "build" / "staged" / "events.parquet")
    assert len(staged) == 200 and str(staged["event_timestamp"].dtype) == "datetime64[us, UTC]"
    assert staged["surface"].tolist() == tiny_raw().events["surface"].tolist()
    assert not (tmp_path / "build" / "quarantine").exists()


def test_bad_rows_are_quarantined_with_a_reason_each(tmp_path):
    run(tmp_path, tiny_raw())  # writes raw/
    ev = tiny_raw().events.astype({"user_id": object, "event_timestamp": object})
    ev.loc[0, "user_id"] = "not-a-number"          # wrong type
    ev.loc[1, "user_id"] = 999                      # unknown id
    ev.loc[2, "pin_id"] = 77                        # unknown pin
    ev.loc[3, "event_type"] = "like"                # unknown event type
    ev.loc[4, "event_timestamp"] = "1970-01-01"     # out of range (too old)
    ev.loc[5, "event_timestamp"] = "2031-01-01"     # out of range (future)
    ev.loc[6, "event_timestamp"] = None             # missing
    ev["user_id"] = ev["user_id"].astype(str)
    ev["event_timestamp"] = ev["event_timestamp"].astype(str).replace("None", None)
    write_events(tmp_path, ev)
    reports = validate_raw(tmp_path / "raw", tmp_path / "build", ContractConfig(max_bad_fraction=0.05), now=NOW)
    r = reports["events"]
    assert (r.input_rows, r.accepted, r.quarantined) == (200, 193, 7)
    q = pd.read_parquet(tmp_path / "build" / "quarantine" / "events.parquet").set_index("row_number")
    assert sorted(q.index) == [0, 1, 2, 3, 4, 5, 6]
    assert q.loc[0, "reason"] == "events.user_id: not a valid int64"
    assert "user_id: known users" in q.loc[1, "reason"]
    assert "pin_id: known pins" in q.loc[2, "reason"]
    assert "event_type: isin" in q.loc[3, "reason"]
    assert "event_timestamp: between" in q.loc[4, "reason"] and "event_timestamp: between" in q.loc[5, "reason"]
    assert "event_timestamp" in q.loc[6, "reason"]
    staged = pd.read_parquet(tmp_path / "build" / "staged" / "events.parquet")
    assert len(staged) == 193 and staged["user_id"].isin([1, 2, 3]).all()


def test_events_checked_part_by_part_give_the_same_staged_quarantined_and_counted_rows(tmp_path):
    """The events file is checked ``contracts.chunk_rows`` rows at a time: the staged file, the quarantine (rows
    numbered by their row in the whole file) and the report equal those of one part; the fraction check is on the
    whole file's counts, and a failed one stages nothing."""
    run(tmp_path, tiny_raw())
    ev = tiny_raw().events.astype({"user_id": object})
    for row in (0, 50, 101, 150, 199):
        ev.loc[row, "user_id"] = 999 if row % 2 else "x"
    ev["user_id"] = ev["user_id"].astype(str)
    write_events(tmp_path, ev)

    def contract(out: str, rows: int, bad: float = 0.05):
        reports = validate_raw(tmp_path / "raw", tmp_path / out, ContractConfig(max_bad_fraction=bad,
                                                                                chunk_rows=rows), now=NOW)
        return (reports["events"], pd.read_parquet(tmp_path / out / "staged" / "events.parquet"),
                pd.read_parquet(tmp_path / out / "quarantine" / "events.parquet"))

    whole, parts = contract("whole", 10**6), contract("parts", 7)
    assert whole[0].quarantined == 5 and whole[0] == parts[0]
    pd.testing.assert_frame_equal(whole[1], parts[1])
    pd.testing.assert_frame_equal(whole[2], parts[2])
    assert parts[2]["row_number"].tolist() == [0, 50, 101, 150, 199]
    with pytest.raises(ContractError, match=r"5 of 200 rows \(2.5%\)"):
        contract("refused", 7, bad=0.01)
    assert not (tmp_path / "refused" / "staged" / "events.parquet").exists()
    assert len(pd.read_parquet(tmp_path / "refused" / "quarantine" / "events.parquet")) == 5


def test_references_follow_quarantined_parents(tmp_path):
    t = tiny_raw()
    t.pins.loc[2, "interest_id"] = 9  # pin 12 points at an unknown interest -> quarantined
    reports = run(tmp_path, t, max_bad_fraction=0.5)
    assert reports["pins"].quarantined == 1
    # every event on pin 12 is now an unknown-pin event, quarantined too
    assert reports["events"].quarantined == sum(1 for i in range(200) if 10 + i % 3 == 12)


def test_duplicate_keys_keep_the_first(tmp_path):
    t = tiny_raw()
    t.users = pd.concat([t.users, t.users.iloc[[0]]], ignore_index=True)
    reports = run(tmp_path, t, max_bad_fraction=0.5)
    assert (reports["users"].accepted, reports["users"].quarantined) == (3, 1)


def test_too_many_bad_rows_fail_naming_file_column_and_count(tmp_path):
    run(tmp_path, tiny_raw())
    ev = tiny_raw().events
    ev.loc[:9, "event_type"] = "like"
    write_events(tmp_path, ev)
    with pytest.raises(ContractError) as e:
        validate_raw(tmp_path / "raw", tmp_path / "build", ContractConfig(max_bad_fraction=0.01), now=NOW)
    msg = str(e.value)
    assert "events.parquet" in msg and "10 of 200 rows" in msg and "event_type" in msg and "(10 rows)" in msg


def test_missing_column_is_named(tmp_path):
    run(tmp_path, tiny_raw())
    write_events(tmp_path, tiny_raw().events.drop(columns=["event_type"]))
    with pytest.raises(ContractError, match=r"events.parquet: missing column\(s\) event_type"):
        validate_raw(tmp_path / "raw", tmp_path / "build", ContractConfig(), now=NOW)


def test_missing_empty_and_corrupt_files(tmp_path):
    with pytest.raises(ContractError, match="raw input not found: .*interests.parquet"):
        validate_raw(tmp_path / "nowhere", tmp_path / "build", ContractConfig(), now=NOW)
    run(tmp_path, tiny_raw())
    write_events(tmp_path, tiny_raw().events.iloc[:0])
    with pytest.raises(ContractError, match="events.parquet: the file has no rows"):
        validate_raw(tmp_path / "raw", tmp_path / "build", ContractConfig(), now=NOW)
    (tmp_path / "raw" / "events.parquet").write_text("user_id,pin_id\n1,2\n")
    with pytest.raises(ContractError, match="events.parquet: cannot be read as parquet"):
        validate_raw(tmp_path / "raw", tmp_path / "build", ContractConfig(), now=NOW)


def test_surface_must_be_known_and_present(tmp_path):
    run(tmp_path, tiny_raw())
    ev = tiny_raw().events
    ev.loc[0, "surface"] = "email"       # not a surface
    ev.loc[1, "surface"] = "Search"      # surfaces are lower case
    ev.loc[2, "surface"] = None          # missing
    write_events(tmp_path, ev)
    reports = validate_raw(tmp_path / "raw", tmp_path / "build", ContractConfig(max_bad_fraction=0.05), now=NOW)
    assert (reports["events"].accepted, reports["events"].quarantined) == (197, 3)
    q = pd.read_parquet(tmp_path / "build" / "quarantine" / "events.parquet").set_index("row_number")
    assert sorted(q.index) == [0, 1, 2]
    assert q.loc[0, "reason"].startswith("events.surface: isin(") and q.loc[1, "reason"] == q.loc[0, "reason"]
    assert q.loc[2, "reason"] == "events.surface: not_nullable"
    staged = pd.read_parquet(tmp_path / "build" / "staged" / "events.parquet")
    assert set(staged["surface"]) == set(SURFACES)


def test_events_without_a_surface_column_are_read_as_homefeed(tmp_path, caplog):
    run(tmp_path, tiny_raw())
    write_events(tmp_path, tiny_raw().events.drop(columns=["surface"]))
    with caplog.at_level(logging.INFO, logger="training.data.contracts"):
        reports = validate_raw(tmp_path / "raw", tmp_path / "build", ContractConfig(), now=NOW)
    assert (reports["events"].accepted, reports["events"].quarantined) == (200, 0)
    staged = pd.read_parquet(tmp_path / "build" / "staged" / "events.parquet")
    assert (staged["surface"] == "homefeed").all()
    said = [r for r in caplog.records if "no surface column" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.INFO and "events.parquet" in said[0].getMessage()


def test_follows_are_optional_and_checked(tmp_path):
    staged = tmp_path / "build" / "staged" / "user_follows.parquet"
    reports = run(tmp_path, tiny_raw())                           # no follows file: an empty table is staged
    assert "user_follows" not in reports and pd.read_parquet(staged).empty
    assert list(pd.read_parquet(staged).columns) == ["user_id", "interest_id", "followed_at"]
    follows = pd.DataFrame({"user_id": [1, 2, 99], "interest_id": [0, 1, 1], "followed_at": [T0] * 3})
    tables = tiny_raw()
    tables.user_follows = follows
    reports = run(tmp_path, tables, max_bad_fraction=0.5)
    assert (reports["user_follows"].accepted, reports["user_follows"].quarantined) == (2, 1)
    assert pd.read_parquet(staged)["user_id"].tolist() == [1, 2]
    write_raw(tiny_raw(), tmp_path / "raw")                       # a source without follows removes the old file
    assert not (tmp_path / "raw" / "user_follows.parquet").exists()
    tables.user_follows = follows.iloc[:0]                         # an empty file is no follows either
    assert "user_follows" not in run(tmp_path, tables)
