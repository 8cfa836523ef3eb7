"""POST /events on the service (in process): durable, idempotent ingestion; fresh features that change the next
retrieval; every bad input a 4xx with nothing applied; a store fault a 503."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest

from tests.bentos.conftest import service_class
from training.features.realtime import log_path
from training.features.store import feature_store, materialize_all

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(live):
    """The service in process on the session's release; afterwards the event log is removed and the online store
    rewritten from the batch tables, so the tests after these see the batch features only."""
    from starlette.testclient import TestClient

    with TestClient(service_class(live.data_dir).to_asgi(), raise_server_exceptions=False) as c:
        yield c
    for suffix in ("", "-wal", "-shm"):
        log_path(live).with_name(log_path(live).name + suffix).unlink(missing_ok=True)
    features = feature_store(live)
    snap = (live.data_path / "live").resolve()
    materialize_all(features.store, datetime.fromisoformat(pd.read_json(snap / "manifest.json", typ="series")["as_of"]))


@pytest.fixture(scope="module")
def world(live) -> dict:
    snap = (live.data_path / "live").resolve()
    seq = pd.read_parquet(snap / "tables" / "user_sequence.parquet")
    pins = pd.read_parquet(snap / "staged" / "pins.parquet")
    cmap = pd.read_parquet(snap / "tables" / "pin_canonical_map.parquet")
    corpus = pd.read_parquet(snap / "tables" / "serving_corpus.parquet")
    last = seq.groupby("user_id").event_timestamp.max()
    users = last[seq.groupby("user_id").history_length.max() > 5].index.to_numpy()
    return {"seq": seq, "pins": pins, "cmap": cmap, "corpus": corpus, "users": users,
            "clock": seq.event_timestamp.max()}


def event(i: str, user: int, pin: int, at: pd.Timestamp, kind: str = "save", surface: str = "homefeed") -> dict:
    return {"event_id": i, "user_id": int(user), "pin_id": int(pin), "event_type": kind,
            "event_timestamp": at.isoformat(), "surface": surface}


def online_sequence(live, user: int) -> dict:
    return {k: v[0] for k, v in feature_store(live).online("user_tower_v2", "user_id", [user]).items()}


def test_events_are_logged_pushed_and_idempotent(client, live, world):
    user = int(world["users"][0])
    pins = world["corpus"]["pin_id"].to_numpy()[:3]
    at = world["clock"] + pd.Timedelta(hours=1)
    batch = [event(f"a{j}", user, p, at + pd.Timedelta(seconds=j)) for j, p in enumerate(pins)]
    r = client.post("/events", json={"events": batch})
    assert r.status_code == 200, r.text
    assert r.json()["accepted"] == 3 and r.json()["duplicates"] == 0 and r.json()["users_pushed"] == 1
    online = online_sequence(live, user)
    canonical = dict(zip(world["cmap"].pin_id, world["cmap"].canonical_pin_id, strict=True))
    assert online["recent_pin_ids"][:3] == [canonical[int(p)] for p in pins[::-1]]
    assert online["recent_pin_ages_days"][0] == 0.0
    assert online["recent_pin_ages_days"][2] == pytest.approx(2 / 86400)
    # the retried batch changes nothing
    again = client.post("/events", json={"events": batch})
    assert again.status_code == 200 and again.json()["accepted"] == 0 and again.json()["duplicates"] == 3
    with sqlite3.connect(log_path(live)) as con:
        assert con.execute("select count(*) from events where event_id like 'a%'").fetchone()[0] == 3
        assert con.execute("pragma journal_mode").fetchone()[0] == "wal"
    assert online_sequence(live, user) == online


def test_non_label_events_do_not_change_the_sequence(client, live, world):
    user = int(world["users"][1])
    before = online_sequence(live, user)
    at = world["clock"] + pd.Timedelta(hours=2)
    pin = int(world["corpus"]["pin_id"].iloc[5])
    batch = [event("n1", user, pin, at, "impression"), event("n2", user, pin, at, "hide"),
             event("n3", user, pin, at, "save", surface="search")]
    r = client.post("/events", json={"events": batch})
    assert r.status_code == 200 and r.json()["accepted"] == 3, r.text
    assert online_sequence(live, user) == before


def test_a_burst_of_saves_in_one_interest_moves_the_next_retrieval(client, live, world):
    """The next /retrieve reads the pushed sequence: for each of 5 users, saves in the user's least retrieved interest
    raise its share of the top 100."""
    corpus = world["corpus"]
    for user in world["users"][2:7]:
        user = int(user)
        before = client.post("/retrieve", json={"user_id": user, "k": 100}).json()
        assert before["retrieval"] == "learned"
        shares = pd.Series([p["interest_id"] for p in before["pins"]]).value_counts()
        interest = min(corpus.interest_id.unique(), key=lambda i: shares.get(i, 0))
        pins = corpus[corpus.interest_id == interest].pin_id.to_numpy()[:20]
        at = world["clock"] + pd.Timedelta(hours=3)
        batch = [event(f"b{user}-{j}", user, p, at + pd.Timedelta(seconds=j)) for j, p in enumerate(pins)]
        assert client.post("/events", json={"events": batch}).status_code == 200
        after = client.post("/retrieve", json={"user_id": user, "k": 100}).json()
        moved = sum(p["interest_id"] == interest for p in after["pins"]) - shares.get(interest, 0)
        assert moved > 0, (user, interest, shares.to_dict())


class TestBadInput:
    """Each gets a 4xx naming what was wrong, and nothing of the batch reaches the log."""

    def logged(self, live) -> int:
        with sqlite3.connect(log_path(live)) as con:
            return con.execute("select count(*) from events").fetchone()[0]

    def good(self, world, i: str) -> dict:
        return event(i, int(world["users"][0]), int(world["corpus"].pin_id.iloc[0]),
                     world["clock"] + pd.Timedelta(hours=4))

    def refused(self, client, live, body, status: int, field: str | None = None, **kw) -> dict:
        before = self.logged(live)
        r = client.post("/events", **({"content": body} if isinstance(body, bytes | str) else {"json": body}), **kw)
        assert r.status_code == status, r.text
        out = r.json()
        assert set(out) == {"error", "field", "details"}
        if field is not None:
            assert out["field"] == field, out
        assert self.logged(live) == before
        return out

    def test_malformed_json(self, client, live):
        self.refused(client, live, b'{"events": [', 400, "body", headers={"content-type": "application/json"})

    def test_missing_and_mistyped_fields(self, client, live, world):
        bad = self.good(world, "m1")
        del bad["pin_id"]
        self.refused(client, live, {"events": [self.good(world, "m0"), bad]}, 400, "events.1.pin_id")
        self.refused(client, live, {"events": [{**self.good(world, "m2"), "user_id": "7"}]}, 400, "events.0.user_id")
        self.refused(client, live, {"events": [{**self.good(world, "m3"), "event_type": "like"}]}, 400,
                     "events.0.event_type")
        self.refused(client, live, {"events": []}, 400, "events")

    def test_unknown_user_and_pin_name_the_rows(self, client, live, world):
        out = self.refused(client, live, {"events": [self.good(world, "u0"), {**self.good(world, "u1"), "user_id": 1},
                                                     {**self.good(world, "u2"), "pin_id": 2}]}, 409,
                           "events.1.user_id")
        assert [(d["row"], d["field"]) for d in out["details"]] == [(1, "events.1.user_id"), (2, "events.2.pin_id")]
        assert "users of the live data snapshot" in out["details"][0]["message"]

    def test_future_timestamp(self, client, live, world):
        future = (datetime.now(UTC) + timedelta(days=2)).isoformat()
        out = self.refused(client, live, {"events": [{**self.good(world, "f1"), "event_timestamp": future}]}, 409,
                           "events.0.event_timestamp")
        assert "in the future" in out["error"]
        self.refused(client, live, {"events": [{**self.good(world, "f2"), "event_timestamp": "2024-01-01T00:00:00"}]},
                     400, "events.0.event_timestamp")   # no UTC offset: ambiguous

    def test_times_outside_what_a_pandas_timestamp_holds(self, client, live, world):
        """Years the schema allows but a pandas timestamp cannot hold (before 1677, after 2262) are refused like any
        time out of bounds, never a 500."""
        early = {**self.good(world, "y1"), "event_timestamp": "0868-05-03T19:36:14-23:42"}
        late = {**self.good(world, "y3"), "event_timestamp": "9205-06-30T08:50:14Z"}
        out = self.refused(client, live, {"events": [early, self.good(world, "y2"), late]}, 409,
                           "events.0.event_timestamp")
        assert [(d["row"], d["field"]) for d in out["details"]] == [(0, "events.0.event_timestamp"),
                                                                   (2, "events.2.event_timestamp")]
        assert "before contracts.min_timestamp" in out["details"][0]["message"]
        assert "in the future" in out["details"][1]["message"]

    def test_duplicate_ids_in_a_batch_and_conflicting_ids(self, client, live, world):
        twice = client.post("/events", json={"events": [self.good(world, "d1"), self.good(world, "d1")]})
        assert twice.status_code == 200 and twice.json()["accepted"] == 1 and twice.json()["duplicates"] == 1
        other = {**self.good(world, "d0"), "event_type": "click"}
        out = self.refused(client, live, {"events": [self.good(world, "d0"), self.good(world, "d4"), other]}, 409,
                           "events.event_id")
        assert [d["row"] for d in out["details"]] == [0, 2]
        assert client.post("/events", json={"events": [self.good(world, "d2")]}).status_code == 200
        changed = {**self.good(world, "d2"), "event_type": "click"}
        self.refused(client, live, {"events": [self.good(world, "d3"), changed]}, 409, "events.event_id")

    def test_oversized_batches(self, client, live, world):
        from training.config import IngestConfig

        n = IngestConfig().max_events + 1
        one = self.good(world, "o")
        self.refused(client, live, {"events": [{**one, "event_id": f"o{i}"} for i in range(n)]}, 400, "events")
        self.refused(client, live, b"{" + b" " * (IngestConfig().max_body_bytes + 1) + b"}", 413, "body",
                     headers={"content-type": "application/json"})


def test_a_locked_event_log_is_a_503_and_nothing_is_acknowledged(client, live, world):
    user = int(world["users"][0])
    batch = [event("lock1", user, int(world["corpus"].pin_id.iloc[1]), world["clock"] + pd.Timedelta(hours=5))]
    con = sqlite3.connect(log_path(live), isolation_level=None)
    con.execute("begin exclusive")
    try:
        r = client.post("/events", json={"events": batch})
    finally:
        con.execute("rollback")
        con.close()
    assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
    with sqlite3.connect(log_path(live)) as c:
        assert c.execute("select count(*) from events where event_id = 'lock1'").fetchone()[0] == 0
    assert client.post("/events", json={"events": batch}).json()["accepted"] == 1


def test_pending_events_are_pushed_by_the_next_batch(client, live, world, monkeypatch):
    """Events committed but not pushed (an online-store fault after the commit) go online with the next call."""
    from training.features.realtime import SequencePusher

    user = int(world["users"][3])
    at = world["clock"] + pd.Timedelta(hours=6)
    pin = int(world["corpus"].pin_id.iloc[7])

    def broken(self, users, events):
        raise RuntimeError("online store down")

    with monkeypatch.context() as m:
        m.setattr(SequencePusher, "push", broken)
        r = client.post("/events", json={"events": [event("p1", user, pin, at)]})
    assert r.status_code == 503 and "logged" in r.json()["error"], r.text
    retry = client.post("/events", json={"events": [event("p1", user, pin, at)]})
    assert retry.status_code == 200 and retry.json()["duplicates"] == 1 and retry.json()["users_pushed"] == 1
    canonical = dict(zip(world["cmap"].pin_id, world["cmap"].canonical_pin_id, strict=True))
    assert online_sequence(live, user)["recent_pin_ids"][0] == canonical[pin]
    assert np.isfinite(online_sequence(live, user)["recent_pin_ages_days"]).all()
