"""Releases on real embedded Milvus: publish (build + verify + switch), rollback, pruning, the version guard,
a release that fails verification, and publishes killed with SIGKILL at each stage."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import unpublished, version_of
from training.config import Config
from training.evaluation.metrics import top_k
from training.features.store import feature_store
from training.model.checkpoint import load_checkpoint
from training.model.towers import run_tower
from training.release.embeddings import corpus, embed_corpus
from training.release.index import EMBEDDING, IndexStore, collection_metadata, search
from training.release.model_store import open_user_tower, stored_user_towers
from training.release.publish import PAUSE_ENV, publish, rollback, sample_users, status
from training.release.registry import Registry, ReleaseError, VersionMismatch, check_pair

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[3]


@pytest.fixture
def cfg(pipeline_cfg, checkpoints) -> Config:
    """The pipeline's data dir with no releases (each test starts from nothing published)."""
    return unpublished(pipeline_cfg)


def test_publish_builds_verifies_and_binds_one_version(cfg, checkpoints):
    out = publish(cfg, checkpoints[0])
    v = version_of(checkpoints[0])
    assert out["live"] == v and out["previous"] is None
    assert out["verification"]["recall"] >= 0.95 and out["verification"]["filtered_recall"] >= 0.95
    release = Registry(cfg).live()
    assert release.model_version == v and release.user_tower == f"user_tower:{v}"
    assert release.feature_services == {"user": "user_tower_v2", "pin": "pin_tower_v1"} and release.snapshot_id
    assert set(release.metrics) >= {"recall@50", "capped_recall@50"}

    store = IndexStore(cfg)
    pins = corpus(cfg)
    with store.client(release.collection, load=True) as c:
        meta = collection_metadata(c, release.collection)
        assert meta["model_version"] == v and meta["feature_services"] == release.feature_services
        assert c.query(release.collection, filter="", output_fields=["count(*)"])[0]["count(*)"] == len(pins)
        row = c.query(release.collection, filter=f"pin_id == {int(pins.pin_id.iloc[0])}",
                      output_fields=["interest_id", "image_signature", "decayed_engagement"])[0]
        assert row["interest_id"] == pins.interest_id.iloc[0] and row["image_signature"] == pins.image_signature.iloc[0]
        assert row["decayed_engagement"] == pytest.approx(pins.decayed_engagement.iloc[0], rel=1e-5)

        # the stored user tower is the checkpoint's, and with this collection answers like exact search over
        # the same pin tower
        tower, encoder, meta_tower = open_user_tower(cfg, release.user_tower)
        assert meta_tower["model_version"] == v and meta_tower["collection"] == release.collection
        check_pair(meta_tower["model_version"], release.collection, meta)
        model, _, _ = load_checkpoint(checkpoints[0])
        sampled = sample_users(cfg, model, encoder, release.feature_services["user"], 20, seed=1)
        users = np.stack(sampled["vector"].to_numpy())
        feats = feature_store(cfg).online_frame(release.feature_services["user"], "user_id", sampled["user_id"])
        np.testing.assert_array_equal(run_tower(tower, encoder.users(feats)), users)
        interests = sampled["top_interest"].to_numpy()
        got = search(c, release.collection, users, 10, release.index["search_params"])
        filtered = search(c, release.collection, users[:5], 10, release.index["search_params"],
                          interests=[int(interests[0])], output_fields=("interest_id",))
    assert all(h["interest_id"] == interests[0] for h in filtered[0])
    assert all(h["pin_id"] in set(pins.pin_id) for hits in got for h in hits)
    emb = embed_corpus(cfg, model, encoder, release.feature_services["pin"])
    exact = emb.frame.pin_id.to_numpy()[top_k(users @ emb.vectors.T, 10)]
    overlap = np.mean([len({h["pin_id"] for h in g} & set(e)) / 10 for g, e in zip(got, exact, strict=True)])
    assert overlap >= 0.9
    assert stored_user_towers(cfg)[v].info.labels == {"model_version": v, "collection": release.collection}
    assert len(release.interest_ids) == cfg.data.n_interests and release.example_user_id is not None


def test_second_publish_switches_and_rollback_restores(cfg, checkpoints):
    v0, v1 = version_of(checkpoints[0]), version_of(checkpoints[1])
    publish(cfg, checkpoints[0])
    out = publish(cfg, checkpoints[1])
    assert out["live"] == v1 and out["previous"] == v0
    assert [r["model_version"] for r in status(cfg)["releases"]] == [v0, v1]
    with pytest.raises(ReleaseError, match="already published"):
        publish(cfg, checkpoints[1])
    back = rollback(cfg)
    assert back == {"live": v0, "rolled_back": v1, "collection": IndexStore(cfg).collection_name(v0)}
    assert Registry(cfg).live().model_version == v0
    with pytest.raises(ReleaseError, match="nothing to roll back to"):
        rollback(cfg)
    # a new publish goes live on top of the rolled-back history; rolling it back returns to v0 (live before
    # it), never to the rolled-back v1
    assert publish(cfg, checkpoints[2])["live"] == version_of(checkpoints[2])
    assert rollback(cfg)["live"] == v0


def test_old_releases_are_pruned_but_live_is_kept(cfg, checkpoints):
    cfg = dataclasses.replace(cfg, index=dataclasses.replace(cfg.index, keep_releases=2))
    for path in checkpoints:
        publish(cfg, path)
    versions = [version_of(p) for p in checkpoints]
    store = IndexStore(cfg)
    assert Registry(cfg).state() == {"live": versions[2], "history": versions[1:], "previous": [versions[1]]}
    assert store.collections() == sorted(store.collection_name(v) for v in versions[1:])
    assert set(stored_user_towers(cfg)) == set(versions[1:])
    assert Registry(cfg).records() == sorted(versions[1:])


def test_embedding_contract_rejects_bad_vectors_and_ids():
    import pandera.errors

    from training.release.embeddings import PinEmbeddings
    from training.release.index import EMBEDDING

    rng = np.random.default_rng(0)
    v = rng.normal(size=(4, 8)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    good = pd.DataFrame({"pin_id": [1, 2, 3, 4], "interest_id": [0, 1, 1, -1], "image_signature": ["a", "b", "c", "d"],
                         "decayed_engagement": np.float32([0.5, 0, 2, 1]), EMBEDDING: list(v)})
    assert len(PinEmbeddings(good).validated(unit_norm=True)) == 4
    assert len(PinEmbeddings(good.assign(**{EMBEDDING: list(v * 3)})).validated()) == 4   # raw inner product
    with pytest.raises(pandera.errors.SchemaErrors):
        PinEmbeddings(good.assign(**{EMBEDDING: [v[0] * 2, v[1], v[2], v[3]]})).validated(unit_norm=True)
    bad = {
        "nan": {EMBEDDING: [v[0], v[1] * np.nan, v[2], v[3]]},
        "inf": {EMBEDDING: [v[0], v[1] * np.inf, v[2], v[3]]},
        "wrong dim": {EMBEDDING: [v[0][:7], v[1], v[2], v[3]]},
        "duplicate id": {"pin_id": [1, 1, 3, 4]},
        "negative engagement": {"decayed_engagement": np.float32([-1, 0, 2, 1])},
    }
    for case, change in bad.items():
        with pytest.raises(pandera.errors.SchemaErrors):
            PinEmbeddings(good.assign(**change)).validated()
            pytest.fail(case)


def test_version_guard_refuses_mismatched_tower_and_collection(cfg, checkpoints):
    publish(cfg, checkpoints[0])
    publish(cfg, checkpoints[1])
    store = IndexStore(cfg)
    v0, v1 = version_of(checkpoints[0]), version_of(checkpoints[1])
    meta1 = store.metadata(store.collection_name(v1))
    check_pair(v1, store.collection_name(v1), meta1)
    with pytest.raises(VersionMismatch, match=f"cannot search collection {store.collection_name(v1)!r}"):
        check_pair(v0, store.collection_name(v1), meta1)
    with pytest.raises(VersionMismatch):
        check_pair(v1, "x", {})


def test_release_failing_verification_never_goes_live(cfg, checkpoints, monkeypatch):
    publish(cfg, checkpoints[0])
    import training.release.publish

    real = training.release.publish.verify
    calls = []

    def degraded(*args, **kwargs):   # the real measurement, then reported as if the ANN index were poor
        calls.append(real(*args, **kwargs))
        return {**calls[-1], "recall": 0.5}

    monkeypatch.setattr(training.release.publish, "verify", degraded)
    with pytest.raises(RuntimeError, match="below index.min_recall"):
        publish(cfg, checkpoints[1])
    assert calls and calls[0]["recall"] >= 0.95
    store = IndexStore(cfg)
    v0 = version_of(checkpoints[0])
    assert Registry(cfg).state() == {"live": v0, "history": [v0], "previous": []}
    assert store.collections() == [store.collection_name(v0)] and set(stored_user_towers(cfg)) == {v0}


def _killed_publish(cfg: Config, checkpoint: Path, stage: str, extra: list[str] | None = None) -> None:
    """Run ``retrieval release publish`` (with ``extra`` arguments) in a subprocess, SIGKILL it (and its children) at
    ``stage``."""
    env = {**os.environ, PAUSE_ENV: stage, "RETRIEVAL_DATA_DIR": cfg.data_dir}
    cmd = [sys.executable, "-m", "training.cli", "release", "publish", "--data_dir", cfg.data_dir,
           "--checkpoint", str(checkpoint), "--index.verify_queries", "60", "--train.threads", "1", *(extra or [])]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 240
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if f"paused at {stage}" in line or time.monotonic() > deadline:
            break
    assert any(f"paused at {stage}" in ln for ln in lines), "".join(lines[-30:])
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize("stage", ["insert", "tower", "switch"])
def test_publish_killed_at_any_stage_leaves_live_serving_and_next_run_recovers(cfg, checkpoints, stage):
    v0, v1 = version_of(checkpoints[0]), version_of(checkpoints[1])
    publish(cfg, checkpoints[0])
    _killed_publish(cfg, checkpoints[1], stage)

    reg, store = Registry(cfg), IndexStore(cfg)
    assert reg.state() == {"live": v0, "history": [v0], "previous": []}
    live = reg.live()
    with store.client(live.collection, load=True) as c:   # the live release still answers
        check_pair(v0, live.collection, collection_metadata(c, live.collection))
        dim = next(f["params"]["dim"] for f in c.describe_collection(live.collection)["fields"]
                   if f["name"] == EMBEDDING)
        assert len(search(c, live.collection, np.eye(1, dim, dtype=np.float32), 5,
                          live.index["search_params"])[0]) == 5
    # the next publish cleans up what the killed one left, then succeeds
    out = publish(cfg, checkpoints[1])
    assert out["live"] == v1
    written_by_stage = {"insert": 0, "tower": 0, "switch": 1}[stage]   # tower + record exist at "switch"
    assert out["cleaned"] == {"collections": [store.collection_name(v1)], "user_towers": [v1] * written_by_stage,
                              "records": [v1] * written_by_stage}
    assert store.collections() == sorted([store.collection_name(v0), store.collection_name(v1)])
    assert pd.Series(reg.records()).tolist() == sorted([v0, v1])
