"""The request logic in process (no HTTP): learned and cold-start answers, the release-dependent checks, and
the release lifecycle (refresh, a retired release closed only once its requests are done)."""

from __future__ import annotations

import pandas as pd
import pytest

from bentos.retriever import NotReady, RetrievalError, Retriever
from tests.conftest import unpublished, version_of
from training.release.publish import publish, rollback

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cfg(pipeline_cfg, checkpoints):
    return unpublished(pipeline_cfg)


@pytest.fixture(scope="module")
def retriever(cfg, checkpoints):
    r = Retriever(cfg)
    with pytest.raises(NotReady, match="no release is live"):
        r.retrieve(1)
    assert r.refresh() is False and r.status() == {"ready": False, "release": None}
    publish(cfg, checkpoints[0])
    assert r.refresh() is True and r.refresh() is False
    yield r
    r.close()


def _user_with_history(cfg) -> int:
    seq = pd.read_parquet(cfg.data_path / "live" / "tables" / "user_sequence.parquet")
    return int(seq.loc[seq.recent_pin_ids.map(len) > 3, "user_id"].iloc[0])


def test_learned_and_cold_start(retriever, cfg, checkpoints):
    out = retriever.retrieve(_user_with_history(cfg), k=7, interests=[1, 2])
    assert out["retrieval"] == "learned" and out["model_version"] == version_of(checkpoints[0])
    assert len(out["pins"]) == 7 and {p["interest_id"] for p in out["pins"]} <= {1, 2}
    assert set(out["timings_ms"]) == {"features", "user_tower", "search"}
    cold = retriever.retrieve(987_654_321, k=3)
    assert cold["retrieval"] == "cold_start" and len(cold["pins"]) == 3


def test_concurrent_requests_share_batches_and_get_the_answers_of_sequential_ones(retriever, cfg):
    """Batched feature reads, user-tower passes and searches give every request exactly its own answer: the same
    pins as alone, within its interests, without its seen pins."""
    from concurrent.futures import ThreadPoolExecutor

    seq = pd.read_parquet(cfg.data_path / "live" / "tables" / "user_sequence.parquet")
    users = [int(u) for u in seq.loc[seq.recent_pin_ids.map(len) > 3, "user_id"].head(24)] + [987_654_321]
    asks = [dict(user_id=u, k=5 + i % 7, interests=[1 + i % 3] if i % 4 == 0 else None, exclude_seen=i % 5 != 0)
            for i, u in enumerate(users)]
    alone = [retriever.retrieve(**a) for a in asks]
    before = retriever._batched.stats()["batches"]  # noqa: SLF001
    with ThreadPoolExecutor(12) as pool:
        together = list(pool.map(lambda a: retriever.retrieve(**a), asks * 4))
    for got, want, ask in zip(together, alone * 4, asks * 4, strict=True):
        assert [p["pin_id"] for p in got["pins"]] == [p["pin_id"] for p in want["pins"]]
        assert got["retrieval"] == want["retrieval"] and len(got["pins"]) == ask["k"]
        if ask["exclude_seen"] and got["retrieval"] == "learned":
            online = retriever.features.online(retriever.current.user_service, "user_id", [ask["user_id"]])
            history = set(online["recent_pin_ids"][0])
            assert not history & {p["pin_id"] for p in got["pins"]}
    stats = retriever._batched.stats()  # noqa: SLF001
    assert stats["batches"] - before < len(asks) * 4 - 4   # some requests did share a batch


def test_unknown_interest_names_the_field(retriever):
    with pytest.raises(RetrievalError, match="unknown interest") as err:
        retriever.retrieve(1, interests=[10_000])
    assert err.value.field == "interests"


def test_status_reports_the_release_and_an_example_user(retriever, checkpoints):
    status = retriever.status()
    assert status["ready"] and status["release"]["model_version"] == version_of(checkpoints[0])
    assert isinstance(status["release"]["example_user_id"], int)


def test_switch_keeps_a_retired_release_open_until_its_requests_finish(retriever, cfg, checkpoints):
    old = retriever.current
    assert old.enter()   # a request in flight on the old release
    publish(cfg, checkpoints[1])
    assert retriever.refresh() and retriever.current.version == version_of(checkpoints[1])
    new = retriever.current
    retriever.refresh()
    assert not old._closed   # still in use  # noqa: SLF001
    rollback(cfg)
    assert retriever.refresh() and retriever.current is old   # a rollback reuses the release still open
    old.leave()
    assert retriever.retrieve(987_654_321, k=1)["model_version"] == version_of(checkpoints[0])
    retriever.refresh()
    assert new._closed and not old._closed   # the retired, idle one is closed; the live one stays  # noqa: SLF001


@pytest.mark.parametrize("backbone", ["masknet", "dhen"])
def test_every_backbone_publishes_and_answers(retriever, cfg, backbone):
    import dataclasses
    from pathlib import Path

    from training.train import train

    short = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, backbone=backbone, epochs=1, patience=1,
                                                               batch_size=256, threads=1))
    out = train(short)
    publish(cfg, Path(out["checkpoint"]))
    assert retriever.refresh() and retriever.current.version == out["model_version"]
    answer = retriever.retrieve(_user_with_history(cfg), k=5)
    assert answer["retrieval"] == "learned" and len(answer["pins"]) == 5
    assert answer["model_version"] == out["model_version"]


@pytest.mark.parametrize("mode, overrides", [("multi", {"multi_embedding": 3}), ("conditional", {"conditional": True})])
def test_multi_embedding_and_conditional_modes_answer_end_to_end(retriever, cfg, mode, overrides):
    """A multi-embedding (conditional) model trains, publishes and answers in its mode: pins merged round-robin,
    each saying which embedding (interest condition) found it, no duplicates, conditioned pins within their
    interest; the release lists the mode and refuses one it does not support."""
    import dataclasses
    from pathlib import Path

    from training.train import train

    short = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=1, patience=1, batch_size=256,
                                                               threads=1, **overrides))
    out = train(short)
    publish(cfg, Path(out["checkpoint"]))
    assert retriever.refresh() and mode in retriever.current.release.modes
    user = _user_with_history(cfg)
    if mode == "multi":
        answer = retriever.retrieve(user, k=20, mode="multi")
        sources = {p["source"] for p in answer["pins"]}
        assert sources <= {f"embedding:{i}" for i in range(3)}
    else:
        answer = retriever.retrieve(user, k=20, interests=[1, 2], mode="conditional")
        assert {p["source"] for p in answer["pins"]} <= {"interest:1", "interest:2"}
        assert all(p["source"] == f"interest:{p['interest_id']}" for p in answer["pins"])
        with pytest.raises(RetrievalError, match="mode"):
            retriever.retrieve(user, k=5, mode="multi")
    assert answer["retrieval"] == "learned" and answer["mode"] == mode and len(answer["pins"]) == 20
    assert len({p["pin_id"] for p in answer["pins"]}) == 20
