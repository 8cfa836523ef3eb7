"""The retrieval service: the API in process (ASGI), then a real `bentoml serve` subprocess: a round trip and
release switches (publish, rollback) under concurrent requests."""

from __future__ import annotations

import time

import httpx
import pandas as pd
import pytest

from tests.bentos.conftest import clients, service_class
from tests.conftest import version_of
from training.release.index import IndexStore
from training.release.publish import publish, rollback

pytestmark = pytest.mark.slow
UNKNOWN_USER = 987_654_321


@pytest.fixture(scope="module")
def users(live) -> dict[str, int]:
    """A user with engagement history, one with a profile but no history (if any)."""
    seq = pd.read_parquet(live.data_path / "live" / "tables" / "user_sequence.parquet")
    with_history = int(seq.loc[seq.recent_pin_ids.map(len) > 3, "user_id"].iloc[0])
    return {"history": with_history}


def check_ok(body: dict, k: int) -> None:
    assert len(body["pins"]) == k and body["collection"] == IndexStore.collection_of(body["model_version"])
    scores = [p["score"] for p in body["pins"]]
    assert scores == sorted(scores, reverse=True)


class TestInProcess:
    @pytest.fixture(scope="class")
    def client(self, live):
        from starlette.testclient import TestClient

        with TestClient(service_class(live.data_dir).to_asgi(), raise_server_exceptions=False) as c:
            yield c

    def test_learned_answer_for_a_user_with_history(self, client, live, users, checkpoints):
        r = client.post("/retrieve", json={"user_id": users["history"], "k": 25})
        assert r.status_code == 200, r.text
        body = r.json()
        check_ok(body, 25)
        assert body["retrieval"] == "learned" and body["model_version"] == version_of(checkpoints[0])
        seq = pd.read_parquet(live.data_path / "live" / "tables" / "user_sequence.parquet")
        seen = set(seq[seq.user_id == users["history"]].sort_values("event_timestamp").recent_pin_ids.iloc[-1])
        assert not seen & {p["pin_id"] for p in body["pins"]}   # exclude_seen defaults to true
        same = client.post("/retrieve", json={"user_id": users["history"], "k": 25, "exclude_seen": False}).json()
        assert len(same["pins"]) == 25

    def test_interest_filter(self, client, users):
        body = client.post("/retrieve", json={"user_id": users["history"], "k": 10, "interests": [1, 2]}).json()
        assert body["retrieval"] == "learned" and {p["interest_id"] for p in body["pins"]} <= {1, 2}

    def test_unknown_user_gets_cold_start_by_decayed_engagement(self, client, live):
        corpus = pd.read_parquet(live.data_path / "live" / "tables" / "serving_corpus.parquet")
        r = client.post("/retrieve", json={"user_id": UNKNOWN_USER, "k": 5})
        assert r.status_code == 200 and r.json()["retrieval"] == "cold_start"
        top = corpus.sort_values(["decayed_engagement", "pin_id"], ascending=[False, True])
        assert [p["pin_id"] for p in r.json()["pins"]] == top.pin_id.head(5).tolist()
        r = client.post("/retrieve", json={"user_id": UNKNOWN_USER, "k": 5, "interests": [3]})
        want = top[top.interest_id == 3].pin_id.head(5).tolist()
        assert [p["pin_id"] for p in r.json()["pins"]] == want

    @pytest.mark.parametrize("body, field", [
        ({}, "user_id"),
        ({"k": 5}, "user_id"),
        ({"user_id": "7"}, "user_id"),
        ({"user_id": 1.5}, "user_id"),
        ({"user_id": True}, "user_id"),
        ({"user_id": 1, "k": 0}, "k"),
        ({"user_id": 1, "k": 1001}, "k"),
        ({"user_id": 1, "k": "10"}, "k"),
        ({"user_id": 1, "interests": "3"}, "interests"),
        ({"user_id": 1, "interests": [3, "x"]}, "interests"),
        ({"user_id": 1, "interests": list(range(65))}, "interests"),
        ({"user_id": 1, "exclude_seen": "yes"}, "exclude_seen"),
        ({"user_id": 1, "colour": "red"}, "colour"),
    ])
    def test_bad_input_is_4xx_naming_the_field(self, client, body, field):
        r = client.post("/retrieve", json=body)
        assert r.status_code == 400, r.text
        assert field in r.text

    def test_what_the_live_release_cannot_answer_is_a_409_naming_the_field(self, client):
        """Schema-valid, but not for this release: an interest id outside its data, a mode it was not trained for."""
        r = client.post("/retrieve", json={"user_id": 1, "interests": [999]})
        assert r.status_code == 409 and r.json()["field"] == "interests" and "999" in r.json()["error"]
        r = client.post("/retrieve", json={"user_id": 1, "mode": "conditional", "interests": list(range(17))})
        assert r.status_code == 409 and r.json()["field"] == "mode"

    def test_malformed_oversized_and_non_json_bodies(self, client):
        assert client.post("/retrieve", content=b'{"user_id": 1,', headers={"content-type": "application/json"}
                           ).status_code == 400
        assert client.post("/retrieve", content=b"[1, 2]", headers={"content-type": "application/json"}
                           ).status_code == 400
        big = b'{"user_id": 1, "interests": [' + b"1," * 20_000 + b"1]}"
        r = client.post("/retrieve", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413 and "body" in r.json()["field"]

        def chunks():
            yield b'{"user_id": 1, "interests": ['
            for _ in range(100):
                yield b"1," * 200
            yield b"1]}"

        r = client.post("/retrieve", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        form = {"content-type": "application/x-www-form-urlencoded"}
        r = client.post("/retrieve", content=b"user_id=1", headers=form)
        assert r.status_code == 415 and r.json()["field"] == "content-type"
        gzipped = {"content-type": "application/json", "content-encoding": "gzip"}
        r = client.post("/retrieve", content=b'{"user_id": 1}', headers=gzipped)
        assert r.status_code == 415 and r.json()["field"] == "content-encoding"

    def test_a_wrong_method_is_a_405_in_the_error_shape_naming_the_allowed_one(self, client):
        for method, path, allowed in (("GET", "/retrieve", "POST"), ("POST", "/healthz", "GET"),
                                      ("DELETE", "/metadata", "GET"), ("PUT", "/docs.json", "GET")):
            r = client.request(method, path)
            assert r.status_code == 405, (method, path, r.status_code)
            assert r.headers["allow"] == allowed
            assert set(r.json()) == {"error", "field", "details"} and r.json()["field"] == "method"

    def test_ops_endpoints_and_openapi(self, client, checkpoints):
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["release"]["model_version"] == version_of(checkpoints[0])
        meta = client.get("/metadata").json()
        assert meta["limits"]["max_k"] == 1000 and meta["release"]["user_tower"].startswith("user_tower:")
        from training import __version__

        assert meta["version"] == __version__ and meta["release"]["project_version"] == __version__
        assert client.get("/docs.json").json()["info"]["version"] == __version__
        paths = client.get("/docs.json").json()["paths"]
        assert {"/retrieve", "/healthz", "/readyz", "/metadata"} <= set(paths)
        schema = str(paths["/retrieve"])
        assert "RetrieveRequest" in schema or "user_id" in str(client.get("/docs.json").json()["components"])


def test_the_real_server_refuses_an_oversized_header_block_at_once(server):
    """`bentoml serve`'s workers run uvicorn with the header limits (bentos/http_limits.py): a 1 MiB header is a 431
    before it is read to its end, and the service goes on answering."""
    import socket
    import time
    from urllib.parse import urlparse

    url = urlparse(server)
    s = socket.create_connection((url.hostname, url.port))
    started = time.perf_counter()
    try:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass
    s.settimeout(5)
    answer = s.recv(4096)
    s.close()
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    assert time.perf_counter() - started < 2
    assert httpx.get(f"{server}/livez", timeout=10).status_code == 200


def test_real_server_round_trip(server, users, checkpoints):
    r = httpx.post(f"{server}/retrieve", json={"user_id": users["history"], "k": 10})
    assert r.status_code == 200
    check_ok(r.json(), 10)
    assert r.json()["model_version"] == version_of(checkpoints[0])
    assert httpx.post(f"{server}/retrieve", json={"user_id": UNKNOWN_USER}).json()["retrieval"] == "cold_start"
    assert httpx.post(f"{server}/retrieve", json={"user_id": 1, "k": 0}).status_code == 400


def test_release_switch_under_concurrent_requests(server, live, users, checkpoints):
    v0, v1 = version_of(checkpoints[0]), version_of(checkpoints[1])

    def wait_for(version: str) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if httpx.get(f"{server}/readyz").json()["release"]["model_version"] == version:
                time.sleep(0.5)   # let requests run on it
                return
            time.sleep(0.1)
        raise AssertionError(f"service did not switch to {version}")

    with clients(server, (users["history"], UNKNOWN_USER) * 4) as results:
        time.sleep(1)
        publish(live, checkpoints[1])
        wait_for(v1)
        rollback(live)
        wait_for(v0)
    codes = pd.Series([c for c, _ in results]).value_counts().to_dict()
    assert codes == {200: len(results)}, codes
    assert {b["model_version"] for _, b in results} == {v0, v1}
    for _, body in results:
        check_ok(body, 20)   # includes: the collection is the user tower's version's, never a mixed pair


def test_each_mode_over_http_and_a_release_refuses_a_mode_it_lacks(server, live, users):
    """A real `bentoml serve`: the single-embedding release refuses multi / conditional with a 400 naming
    `mode`; a multi-embedding + conditional release answers every mode, with filters, each pin saying what found
    it; then a rollback restores the single release and its refusal."""
    import dataclasses
    from pathlib import Path

    from training.train import train

    def ask(**body):
        return httpx.post(f"{server}/retrieve", json={"user_id": users["history"], "k": 15, **body}, timeout=30)

    def wait_for(modes: list[str]) -> dict:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            release = httpx.get(f"{server}/readyz").json()["release"]
            if release["modes"] == modes:
                return release
            time.sleep(0.2)
        raise AssertionError(f"the service did not switch to a release with modes {modes}")

    for mode in ("multi", "conditional"):
        r = ask(mode=mode)
        assert r.status_code == 409 and r.json()["field"] == "mode" and "does not support" in r.json()["error"]
    short = dataclasses.replace(live, train=dataclasses.replace(live.train, epochs=1, patience=1, batch_size=256,
                                                                threads=1, multi_embedding=3, conditional=True))
    publish(live, Path(train(short)["checkpoint"]))
    try:
        release = wait_for(["single", "multi", "conditional"])
        single = ask(mode="single").json()
        assert single["mode"] == "single" and {p["source"] for p in single["pins"]} == {"embedding:0"}
        multi = ask(mode="multi", interests=[1, 2, 3]).json()
        assert multi["mode"] == "multi" and {p["source"] for p in multi["pins"]} <= {f"embedding:{i}" for i in range(3)}
        assert {p["interest_id"] for p in multi["pins"]} <= {1, 2, 3}
        cond = ask(mode="conditional", interests=[1, 2]).json()
        assert cond["mode"] == "conditional" and {p["source"] for p in cond["pins"]} <= {"interest:1", "interest:2"}
        assert all(p["source"] == f"interest:{p['interest_id']}" for p in cond["pins"])
        inferred = ask(mode="conditional").json()   # no interests named: the user's inferred top interests
        assert inferred["retrieval"] == "learned" and all(p["source"].startswith("interest:") for p in inferred["pins"])
        for body in (single, multi, cond, inferred):
            assert body["model_version"] == release["model_version"] and len(body["pins"]) == 15
            assert len({p["pin_id"] for p in body["pins"]}) == 15
        assert ask().json()["mode"] == release["default_mode"]
        too_many = ask(mode="conditional", interests=list(range(17)))
        assert too_many.status_code == 400 and too_many.json()["field"] == "interests"
    finally:
        rollback(live)
    wait_for(["single"])
    assert ask(mode="multi").status_code == 409
