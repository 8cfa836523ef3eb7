"""The scale-out path run for real: Feast on Redis, releases on a Milvus server (HNSW, the `pins_live` alias,
version metadata as collection properties), and the service with two workers following a release switch under
load."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from tests.bentos.conftest import clients, free_port
from tests.conftest import perturbed_copies
from tests.training.features.test_feast import SERVICES, assert_online_equals_offline
from training.release.index import IndexStore, collection_metadata
from training.release.publish import publish, rollback

pytestmark = [pytest.mark.server, pytest.mark.slow]


@pytest.fixture(scope="module")
def models(server_cfg) -> list[Path]:
    """A short real training run and two perturbed copies under other versions."""
    from training.train import train

    return perturbed_copies(server_cfg, Path(train(server_cfg)["checkpoint"]))


def _alias_target(cfg) -> str | None:
    with IndexStore(cfg).client(None) as c:
        return next((n for n in c.list_collections() if cfg.index.alias in c.list_aliases(n).get("aliases", [])),
                    None)


@pytest.mark.parametrize("service,key,table", [(SERVICES[0], "user_id", "user_features"),
                                               (SERVICES[1], "pin_id", "pin_features")])
def test_redis_online_values_equal_latest_offline_values(server_cfg, service, key, table):
    assert server_cfg.features.online_store == "redis"
    assert_online_equals_offline(server_cfg, service, key, table)


def test_publish_builds_hnsw_on_the_server_and_the_alias_follows_publish_and_rollback(server_cfg, models):
    first = publish(server_cfg, models[0])
    a = IndexStore.collection_of(first["live"])
    assert _alias_target(server_cfg) == a
    with IndexStore(server_cfg).client(a) as c:
        assert collection_metadata(c, a)["model_version"] == first["live"]
        assert c.describe_index(a, "embedding")["index_type"] == "HNSW"
    second = publish(server_cfg, models[1])
    assert _alias_target(server_cfg) == IndexStore.collection_of(second["live"]) != a
    rollback(server_cfg)
    assert _alias_target(server_cfg) == a


def test_hnsw_over_pins_of_unequal_norms_stores_unit_vectors_and_returns_the_exact_inner_products(server_cfg,
                                                                                                 models):
    import numpy as np

    from training.model.checkpoint import load_checkpoint
    from training.release.embeddings import embed_corpus
    from training.release.index import MIPS_NORM, search
    from training.release.publish import sample_users
    from training.release.registry import Registry

    reg = Registry(server_cfg)
    if reg.state()["live"] is None:
        publish(server_cfg, models[0])
    release = reg.live()
    model, encoder, payload = load_checkpoint(server_cfg.data_path / "models" / release.model_version / "model.pt")
    emb = embed_corpus(server_cfg, model, encoder, release.feature_services["pin"])
    norms = np.linalg.norm(emb.vectors, axis=1)
    assert norms.max() - norms.min() > 1e-3   # the default model's pins (pin bias, blended pre-trained score)
    params = release.index["search_params"]
    assert params[MIPS_NORM] == pytest.approx(norms.max(), rel=1e-5)
    users = sample_users(server_cfg, model, encoder, release.feature_services["user"], 20, seed=3)
    queries = np.stack(users["vector"].to_numpy())
    by_id = dict(zip(emb.frame["pin_id"].to_numpy().tolist(), emb.vectors, strict=True))
    with IndexStore(server_cfg).client(release.collection) as c:
        assert c.describe_collection(release.collection)["fields"][-1]["params"]["dim"] == emb.vectors.shape[1] + 1
        for q, hits in zip(queries, search(c, release.collection, queries, 10, params), strict=True):
            assert [h["score"] for h in hits] == pytest.approx([float(q @ by_id[h["pin_id"]]) for h in hits],
                                                               abs=1e-4)
        # a k above the release's ef (the service raises k by a user's seen pins): Milvus needs ef >= k
        k = min(params["ef"] + 40, len(emb.frame))
        assert k > params["ef"]
        assert len(search(c, release.collection, queries[:2], k, params)[0]) == k


def test_two_workers_on_the_server_and_redis_follow_a_switch_with_no_failed_request(server_cfg, models):
    from bentos.launcher import start, stop
    from training.release.registry import Registry

    v0, v1 = models[0].parent.name, models[2].parent.name
    if Registry(server_cfg).state()["live"] != v0:   # the previous test leaves v0 live (and v1 published)
        publish(server_cfg, models[0])
    cfg = dataclasses.replace(server_cfg, serve=dataclasses.replace(server_cfg.serve, port=free_port(), workers=2))
    seq = pd.read_parquet(cfg.data_path / "live" / "tables" / "user_sequence.parquet")
    users = [int(u) for u in seq.loc[seq.recent_pin_ids.map(len) > 3, "user_id"].head(8)]
    url = start(cfg)["url"]
    try:
        with clients(url, users, timeout=30) as results:
            time.sleep(2)
            publish(server_cfg, models[2])
            _wait_for_all_workers(url, results, v1)
            rollback(server_cfg)
            _wait_for_all_workers(url, results, v0)
    finally:
        stop(cfg)
    codes = pd.Series([c for c, _ in results]).value_counts().to_dict()
    assert codes == {200: len(results)}, codes
    assert {b["model_version"] for _, b in results} == {v0, v1}
    for _, body in results:
        assert body["collection"] == IndexStore.collection_of(body["model_version"])   # never a mixed pair
        assert body["retrieval"] == "learned" and len(body["pins"]) == 20


def _wait_for_all_workers(url: str, results: list, version: str, timeout: float = 90) -> None:
    """Until the last 30 answers all come from ``version`` (both workers switched)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        recent = results[-30:]
        if len(recent) == 30 and all(b.get("model_version") == version for _, b in recent):
            return
        time.sleep(0.2)
    raise AssertionError(f"the workers did not all switch to {version}")


def test_a_data_dir_pointed_at_another_online_store_is_materialized_in_full(server_cfg):
    """The features stage is incremental only into the store that holds the snapshot: pointed at another one
    (a new Redis), it rebuilds in full (found when a restarted stack's empty Redis was left empty)."""
    from training.data.snapshot import load_live
    from training.features.store import feature_store

    snap = load_live(server_cfg)
    assert feature_store(server_cfg).materialize(snap.as_of, snap.id)["mode"] == "incremental"
    port = server_cfg.features.redis_connection.rsplit(":", 1)[1]
    other = dataclasses.replace(server_cfg, features=dataclasses.replace(server_cfg.features,
                                                                          redis_connection=f"localhost:{port}"))
    assert feature_store(other).materialize(snap.as_of, snap.id)["mode"] == "full"
    assert_online_equals_offline(other, SERVICES[0], "user_id", "user_features")


def test_a_publish_killed_on_the_server_leaves_the_live_release_and_its_alias(server_cfg, models, tmp_path):
    """SIGKILL during the inserts of a publish to the server: the registry, the alias and searches through the
    alias are those of the live release; the next publish drops the half-built collection and moves the alias."""
    import numpy as np
    import yaml

    from tests.training.release.test_release import _killed_publish
    from training.release.index import MIPS_NORM, search
    from training.release.registry import Registry

    reg, store = Registry(server_cfg), IndexStore(server_cfg)
    if reg.state()["live"] is None:
        publish(server_cfg, models[0])
    before = reg.state()
    live = reg.live()
    payload = torch.load(models[0], weights_only=True)
    fresh = server_cfg.data_path / "models" / f"{payload['model_version']}-killed" / "model.pt"
    fresh.parent.mkdir(parents=True)
    torch.save({**payload, "model_version": fresh.parent.name}, fresh)
    config = tmp_path / "server.yaml"
    config.write_text(yaml.safe_dump({"index": dataclasses.asdict(server_cfg.index),
                                      "features": dataclasses.asdict(server_cfg.features)}))
    _killed_publish(server_cfg, fresh, "insert", extra=["--config", str(config)])

    half = IndexStore.collection_of(fresh.parent.name)
    assert half in store.collections(), "the kill came before the collection existed"
    assert reg.state() == before and _alias_target(server_cfg) == live.collection
    with store.client(live.collection, load=True) as c:
        dim = next(f["params"]["dim"] for f in c.describe_collection(live.collection)["fields"]
                   if f["name"] == "embedding")
        query = np.eye(1, dim - (MIPS_NORM in live.index["search_params"]), dtype=np.float32)   # the tower's dim
        direct = search(c, live.collection, query, 10, live.index["search_params"])[0]
        through_alias = search(c, server_cfg.index.alias, query, 10, live.index["search_params"])[0]
    assert [h["pin_id"] for h in through_alias] == [h["pin_id"] for h in direct] and len(direct) == 10

    out = publish(server_cfg, fresh)
    assert half in out["cleaned"]["collections"]
    assert _alias_target(server_cfg) == half == out["collection"]


def test_the_partition_count_of_the_interest_partition_key_is_configurable(server_cfg):
    import numpy as np

    from training.release.embeddings import PinEmbeddings
    from training.release.index import EMBEDDING, build_collection

    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(50, 8)).astype(np.float32)
    emb = PinEmbeddings(pd.DataFrame({"pin_id": np.arange(50, dtype=np.int64), "interest_id": np.arange(50) % 5,
                                      "image_signature": [f"s{i}" for i in range(50)],
                                      "decayed_engagement": np.ones(50, np.float32), EMBEDDING: list(vectors)}))
    ic = dataclasses.replace(server_cfg.index, partitions=4)
    store, name = IndexStore(dataclasses.replace(server_cfg, index=ic)), "pins_partition_probe"
    try:
        with store.client(name) as c:
            info = build_collection(c, name, emb, {"model_version": "probe"}, ic)
            assert c.describe_collection(name)["num_partitions"] == 4
            assert info["search_params"]["mips_max_norm"] == pytest.approx(np.linalg.norm(vectors, axis=1).max())
    finally:
        store.drop(name)


def test_events_on_two_workers_push_to_redis_the_rows_the_batch_computes(server_cfg, models):
    """POST /events spread over two workers sharing one event log in Redis (the scale-out log; two processes on the
    SQLite log: tests/training/features/test_realtime.py): every event logged once, and Redis holds for each user
    the row computed from the live snapshot and every logged event (none lost to a race between workers)."""
    import httpx

    log = "redis"
    from bentos.launcher import start, stop
    from training.features.realtime import SequencePusher, log_path, open_log
    from training.features.store import feature_store
    from training.release.registry import Registry

    if Registry(server_cfg).state()["live"] is None:
        publish(server_cfg, models[0])
    cfg = dataclasses.replace(server_cfg, serve=dataclasses.replace(server_cfg.serve, port=free_port(), workers=2),
                              ingest=dataclasses.replace(server_cfg.ingest, log=log))
    for suffix in ("", "-wal", "-shm"):
        log_path(cfg).with_name(log_path(cfg).name + suffix).unlink(missing_ok=True)
    live = (cfg.data_path / "live").resolve()
    seq = pd.read_parquet(live / "tables" / "user_sequence.parquet")
    corpus = pd.read_parquet(live / "tables" / "serving_corpus.parquet").pin_id.to_numpy()
    users = [int(u) for u in seq.user_id.unique()[:6]]
    clock = seq.event_timestamp.max()
    url = start(cfg)["url"]
    try:
        def post(i: int) -> int:
            events = [{"event_id": f"srv-{log}-{i}-{j}", "user_id": users[(i + j) % len(users)],
                       "pin_id": int(corpus[(7 * i + j) % len(corpus)]), "event_type": "save",
                       "event_timestamp": (clock + pd.Timedelta(seconds=10 * i + j)).isoformat()} for j in range(5)]
            with httpx.Client(base_url=url, timeout=30) as c:
                return c.post("/events", json={"events": events}).status_code

        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(post, range(40)))
    finally:
        stop(cfg)
    assert codes == [200] * 40
    events_log = open_log(cfg)
    assert events_log.count() == 200 and events_log.pending() == 0
    frame = events_log.frame()
    assert frame.event_id.is_unique and frame.event_id.str.startswith(f"srv-{log}-").all()
    frame["event_us"] = frame.event_timestamp.astype("int64")
    expected = SequencePusher(cfg).rows(users, frame).set_index("user_id")
    online = feature_store(cfg).online_frame("user_tower_v2", "user_id", users).set_index("user_id")
    for u in users:
        assert online.loc[u, "recent_pin_ids"] == expected.loc[u, "recent_pin_ids"], u
        assert online.loc[u, "recent_pin_ages_days"] == expected.loc[u, "recent_pin_ages_days"], u


def test_the_redis_event_log_is_idempotent_all_or_nothing_and_feeds_the_build(server_cfg):
    """The scale-out log: a retried batch changes nothing, a conflicting id writes nothing, the export reads every
    event in log order, and a rewind makes the next flush push those users again."""
    from training.features.realtime import LogConflict, RedisEventLog

    log = RedisEventLog(server_cfg.features.redis_connection, prefix=f"test:{time.time_ns()}")
    t0 = pd.Timestamp("2026-01-01", tz="UTC")
    rows = pd.DataFrame([("a", 1, 10, "save", t0, "homefeed"), ("b", 2, 11, "click", t0 + pd.Timedelta("1us"),
                                                                 "homefeed")],
                        columns=["event_id", "user_id", "pin_id", "event_type", "event_timestamp", "surface"])
    first = log.append(rows)
    assert (first.new, first.duplicates, first.last_seq) == (2, 0, 2)
    again = log.append(rows)
    assert (again.new, again.duplicates) == (0, 2)
    changed = rows.assign(event_id=["c", "a"], pin_id=[12, 99])
    with pytest.raises(LogConflict) as e:
        log.append(changed)
    assert e.value.rows == [1] and log.count() == 2
    out = log.frame()
    assert list(out.event_id) == ["a", "b"] and out.event_timestamp.iloc[1] == t0 + pd.Timedelta("1us")

    class Recorder:
        def __init__(self):
            self.calls = []

        def push(self, users, fetch):
            self.calls.append((users, len(fetch(users))))
            return len(users)

    rec = Recorder()
    assert log.flush(rec) == {"users": 2, "rows": 2, "pushed_seq": 2} and log.pending() == 0
    assert log.flush(rec, upto=2)["rows"] == 0   # already pushed
    log.rewind(1)
    assert log.flush(rec)["users"] == 1 and rec.calls[-1] == ([2], 1)
