"""The real-time path: the event log (durable, idempotent, all or nothing), the pushed ``user_sequence`` rows, and
their parity with what dbt computes when the next build reads the log."""

from __future__ import annotations

import dataclasses
import shutil
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from training.features.realtime import EventLog, LogConflict, SequencePusher, export, log_path, sequence_row

US = 1_000_000


def frame(rows: list[tuple]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["event_id", "user_id", "pin_id", "event_type", "event_timestamp", "surface"])


def at(seconds: float) -> pd.Timestamp:
    return pd.Timestamp("2026-01-01", tz="UTC") + pd.Timedelta(seconds=seconds)


class TestEventLog:
    def test_append_is_durable_idempotent_and_all_or_nothing(self, tmp_path):
        log = EventLog(tmp_path / "ingest.db")
        first = frame([("a", 1, 10, "save", at(0), "homefeed"), ("b", 1, 11, "click", at(1), "homefeed")])
        assert log.append(first).new == 2
        again = log.append(first)
        assert (again.new, again.duplicates) == (0, 2)
        with pytest.raises(LogConflict) as e:
            log.append(frame([("c", 2, 12, "save", at(2), "homefeed"), ("a", 1, 10, "click", at(0), "homefeed")]))
        assert e.value.rows == [1] and e.value.ids == ["a"]
        assert log.count() == 2   # "c" was not written either
        con = sqlite3.connect(tmp_path / "ingest.db")
        assert con.execute("pragma journal_mode").fetchone()[0] == "wal"
        assert log._conn().execute("pragma synchronous").fetchone()[0] == 2   # FULL
        out = log.frame()
        assert list(out.event_id) == ["a", "b"] and str(out.event_timestamp.dtype) == "datetime64[us, UTC]"

    def test_export_writes_the_raw_events_layout(self, tmp_path):
        from training.config import Config

        cfg = Config(data_dir=str(tmp_path))
        target = tmp_path / "raw" / "ingested_events.parquet"
        assert export(cfg, target) is None and not target.exists()
        log = EventLog(log_path(cfg))
        assert export(cfg, target) is None and not target.exists()   # an empty log changes no snapshot id
        log.append(frame([("a", 1, 10, "save", at(0.000001), "homefeed")]))
        assert export(cfg, target) == (1, 1)   # events, the last log sequence number
        back = pd.read_parquet(target)
        assert list(back.columns) == ["event_id", "user_id", "pin_id", "event_type", "event_timestamp", "surface"]
        assert back.event_timestamp.iloc[0] == at(0.000001)


class _Recorder:
    """A pusher that records what it was asked to push (every flush reads the log after taking the push lock)."""

    def push(self, users, fetch):
        time.sleep(0.01)
        return len(users)


def _append_and_flush(path: str, worker: int) -> int:
    log = EventLog(Path(path), timeout=10)
    failures = 0
    threads = []

    def run(t: int) -> None:
        nonlocal failures
        for i in range(15):
            rows = frame([(f"{worker}-{t}-{i}-{j}", j, 10 + j, "save", at(i), "homefeed") for j in range(5)])
            done = log.append(rows)
            log.flush(_Recorder(), upto=done.last_seq)
            if log.pushed_seq() < done.last_seq:
                failures += 1

    for t in range(4):
        threads.append(threading.Thread(target=run, args=(t,)))
        threads[-1].start()
    for th in threads:
        th.join()
    return failures


def test_two_processes_append_and_push_without_a_lost_or_unpushed_event(tmp_path):
    """Two processes with four threads each append and push at once: every event is logged once, each caller's
    events are pushed before its flush returns, and nothing waits long enough to fail (pushes are shared)."""
    import multiprocessing as mp

    path = str(tmp_path / "ingest.db")
    EventLog(Path(path))
    with mp.get_context("spawn").Pool(2) as pool:
        failures = pool.starmap(_append_and_flush, [(path, 0), (path, 1)])
    log = EventLog(Path(path))
    assert failures == [0, 0]
    assert log.count() == 2 * 4 * 15 * 5 and log.frame().event_id.is_unique and log.pending() == 0


def test_sequence_row_is_dbt_s_row():
    """Newest first, ages from the newest engagement, stamped 1 µs after it, the time truncated to whole seconds."""
    t0 = int(at(0).value // 1000)
    row = sequence_row(7, [(t0, 5), (t0 + 1_500_000, 3), (t0 + 1_500_000, 4)])
    assert row["recent_pin_ids"] == [4, 3, 5]
    assert row["recent_pin_ages_days"] == [0.0, 0.0, 1.5 / 86400]
    assert row["event_timestamp"] == at(1.500001) and row["user_sequence_at"] == at(1)
    assert row["history_length"] == 3


def test_the_instants_behind_the_snapshot_s_ages_are_recovered_exactly():
    """The snapshot stores ages (doubles, DuckDB's arithmetic); the instants behind them come back to the µs, so a
    logged event already in the snapshot is the same (instant, pin) pair and counts once."""
    from training.features.realtime import _epoch, _times

    rng = np.random.default_rng(0)
    newest = 1_790_000_000_000_000 + int(rng.integers(0, 10**12))
    times = newest - rng.integers(0, 120 * 86400 * US, 100_000)
    ages = np.array([(_epoch(newest) - _epoch(int(t))) / 86400.0 for t in times])
    assert (_times(newest, ages) == times).all()


@pytest.mark.slow
def test_pushed_features_equal_what_the_next_build_computes(pipeline_cfg, tmp_path):
    """Events pushed online for sampled users (new pins, near-duplicate pins, ties, non-label events), then a build
    that reads the log: the online values equal the rebuilt ``user_sequence``'s newest rows field by field."""
    from training.data.snapshot import build, switch_live
    from training.features.store import Features

    cfg = dataclasses.replace(pipeline_cfg, data_dir=str(tmp_path / "copy"))
    src = pipeline_cfg.data_path
    shutil.copytree(src / "raw", cfg.data_path / "raw")
    snap = (src / "live").resolve()
    shutil.copytree(snap, cfg.data_path / "snapshots" / snap.name)
    (cfg.data_path / "live").symlink_to(f"snapshots/{snap.name}")
    shutil.copytree(src / "feast", cfg.data_path / "feast")
    features = Features(cfg)
    features.apply()

    live = (cfg.data_path / "live").resolve()
    seq = pd.read_parquet(live / "tables" / "user_sequence.parquet")
    cmap = pd.read_parquet(live / "tables" / "pin_canonical_map.parquet")
    dupes = cmap[cmap.pin_id != cmap.canonical_pin_id].pin_id.to_numpy()
    pins = cmap.pin_id.to_numpy()
    clock = seq.event_timestamp.max()
    rng = np.random.default_rng(0)
    users = rng.choice(seq.user_id.unique(), 12, replace=False)
    rows = []
    for i, u in enumerate(users):
        base = clock + pd.Timedelta(minutes=i, microseconds=int(rng.integers(0, 999_999)))
        for j in range(8):
            kind = ["save", "click", "closeup", "hide", "impression", "save", "save", "click"][j]
            pin = int(dupes[j % len(dupes)]) if j == 5 and len(dupes) else int(rng.choice(pins))
            when = base if j in (6, 7) else base - pd.Timedelta(hours=j, microseconds=j)   # a tie at the newest
            rows.append((f"{u}-{j}", int(u), pin, kind, when, "search" if j == 2 else "homefeed"))
    # one user's newest logged events all one (instant, pin) pair, more of them than the push reads at first
    heavy, n = int(users[1]), cfg.transform.history_length
    top = clock + pd.Timedelta(hours=1)
    rows += [(f"dup-{k}", heavy, int(pins[0]), "save", top, "homefeed") for k in range(2 * n + 5)]
    rows += [(f"old-{k}", heavy, int(pins[k + 1]), "click", top - pd.Timedelta(minutes=k + 1), "homefeed")
             for k in range(10)]
    log = EventLog(log_path(cfg))
    log.append(frame(rows))
    assert log.flush(SequencePusher(cfg, features))["rows"] == len(users)
    online = features.online_frame("user_tower_v2", "user_id", users).set_index("user_id")

    switch_live(cfg, build(cfg))
    rebuilt = pd.read_parquet((cfg.data_path / "live").resolve() / "tables" / "user_sequence.parquet")
    newest = rebuilt.sort_values("event_timestamp").groupby("user_id").tail(1).set_index("user_id")
    for u in users:
        assert online.loc[u, "recent_pin_ids"] == list(newest.loc[u, "recent_pin_ids"]), u
        assert online.loc[u, "recent_pin_ages_days"] == list(newest.loc[u, "recent_pin_ages_days"]), u
        assert online.loc[u, "history_length"] == newest.loc[u, "history_length"], u
        assert pd.Timestamp(online.loc[u, "user_sequence_at"]) == newest.loc[u, "user_sequence_at"], u
    manifest = pd.read_json((cfg.data_path / "live").resolve() / "manifest.json", typ="series")
    assert manifest["contracts"]["ingested_events"]["accepted"] == len(rows)
    assert manifest["ingested_through_seq"] == len(rows)

    # an event logged after the build: materializing the snapshot (which lacks it) must not hide it online
    from training.pipeline import features as features_stage

    late = int(users[0])
    log.append(frame([("late", late, int(pins[3]), "save", clock + pd.Timedelta(days=1), "homefeed")]))
    log.flush(SequencePusher(cfg, features))
    pushed = features.online_frame("user_tower_v2", "user_id", [late]).iloc[0]
    assert pushed["history_length"] == min(newest.loc[late, "history_length"] + 1, cfg.transform.history_length)
    features_stage(cfg)
    again = Features(cfg).online_frame("user_tower_v2", "user_id", [late]).iloc[0]
    assert again["recent_pin_ids"] == pushed["recent_pin_ids"]
    assert again["recent_pin_ages_days"] == pushed["recent_pin_ages_days"]
