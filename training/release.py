"""Stage: retrieval releases. A release binds one model version to its user tower and its pin collection.

A release records the model version, the user-tower artifact (BentoML model ``user_tower:<version>``,
labelled with its version and collection), the collection (``<prefix>_<version>``), the feature services,
the data snapshot and the evaluation metrics. The same facts are on the collection (its description) and
in the registry under ``<data_dir>/releases/`` that the service reads:

    registry.json        {"live": version, "history": [published versions, oldest first],
                          "previous": [versions that were live before the live one, most recent last]}
    <version>.json       the release record

``publish`` builds the new collection completely, verifies its row count and its ANN recall against exact
search on sampled user embeddings, stores the user tower, and only then switches the alias and the
registry (one atomic file replace is the switch the service sees). ``rollback`` makes the release that
was live before the live one live again (a rolled-back release never comes back by a later rollback).
Both hold an exclusive lock on the registry. A publish killed at any point leaves ``registry.json``
untouched, so the live release keeps serving; the next publish (or ``recover``) deletes whatever the dead
one left (collections, towers, records not in the registry) and re-points the alias at the live collection.

``check_pair`` is the version guard: a user tower and a collection of different model versions are never
paired (the service and publish both call it).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from training.config import Config, TrainConfig
from training.index import (
    IndexBuildError,
    IndexStore,
    PinEmbeddings,
    build_collection,
    collection_metadata,
    embed_corpus,
    row_count,
    verify,
)

log = logging.getLogger(__name__)

USER_TOWER_MODEL = "user_tower"
CHECKPOINT_FILE = "model.pt"
PAUSE_ENV = "RETRIEVAL_PAUSE_AT"
"""Fault injection for the crash tests: a publish pauses (sleeps) when it reaches the named point."""


class VersionMismatch(RuntimeError):
    """A user tower and a collection of different model versions were about to be paired."""


class ReleaseError(RuntimeError):
    """A release cannot be published or restored."""


@dataclass
class Release:
    model_version: str
    collection: str
    index_uri: str
    alias: str
    user_tower: str
    """BentoML model tag of the user tower, ``user_tower:<version>``."""
    feature_services: list[str]
    snapshot_id: str
    as_of: str
    metrics: dict[str, float]
    index: dict[str, Any]
    """Rows, index type and parameters, search parameters, timings and the verification result."""
    created_at: str

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Release:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def check_pair(tower_version: str, collection: str, collection_meta: dict[str, Any]) -> None:
    """Raise ``VersionMismatch`` unless the collection was built by the tower's model version."""
    built_by = collection_meta.get("model_version")
    if built_by != tower_version:
        raise VersionMismatch(f"user tower {tower_version!r} cannot search collection {collection!r}, "
                              f"built by model version {built_by!r}")


# --- the registry ------------------------------------------------------------------------------------------------


class Registry:
    """``<data_dir>/releases``: the live pointer, the publish history and one record per release."""

    def __init__(self, cfg: Config):
        self.dir = cfg.data_path / "releases"

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive lock for publish / rollback / recover (released by the kernel if the holder dies)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def state(self) -> dict[str, Any]:
        path = self.dir / "registry.json"
        if not path.exists():
            return {"live": None, "history": [], "previous": []}
        state = json.loads(path.read_text())
        if "previous" not in state:   # registries written before the rollback stack: publish order
            live = state["live"]
            state["previous"] = state["history"][:state["history"].index(live)] if live else []
        return state

    def write_state(self, state: dict[str, Any]) -> None:
        _atomic_write(self.dir / "registry.json", json.dumps(state, indent=2))

    def record(self, version: str) -> Release:
        path = self.dir / f"{version}.json"
        if not path.exists():
            raise ReleaseError(f"no release record for {version} at {path}")
        return Release.from_dict(json.loads(path.read_text()))

    def save_record(self, release: Release) -> None:
        _atomic_write(self.dir / f"{release.model_version}.json", json.dumps(asdict(release), indent=2))

    def records(self) -> list[str]:
        return sorted(p.stem for p in self.dir.glob("*.json") if p.name != "registry.json")

    def live(self) -> Release | None:
        version = self.state()["live"]
        return self.record(version) if version else None


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


# --- the user tower in the BentoML model store -------------------------------------------------------------------


def bentoml_home(cfg: Config) -> Path:
    """The BentoML home of this deployment (its model store); ``bentoml serve/build`` run with BENTOML_HOME=this."""
    return cfg.data_path / "bentoml"


def model_store(cfg: Config):
    from bentoml._internal.models.model import ModelStore

    path = bentoml_home(cfg) / "models"
    path.mkdir(parents=True, exist_ok=True)
    return ModelStore(str(path))


def save_user_tower(cfg: Config, checkpoint: Path, version: str, collection: str, meta: dict[str, Any]) -> str:
    import bentoml

    labels = {"model_version": version, "collection": collection}
    with bentoml.models.create(f"{USER_TOWER_MODEL}:{version}", labels=labels, metadata=meta,
                               _model_store=model_store(cfg)) as m:
        shutil.copyfile(checkpoint, m.path_of(CHECKPOINT_FILE))
    return f"{USER_TOWER_MODEL}:{version}"


def user_tower_models(cfg: Config) -> dict[str, Any]:
    """version -> BentoML model of every stored user tower."""
    from bentoml.exceptions import NotFound

    try:
        return {str(m.tag.version): m for m in model_store(cfg).list(USER_TOWER_MODEL)}
    except NotFound:
        return {}


def load_user_tower(cfg: Config, tag: str):
    """(model, encoder, payload) of a stored user tower; checks its label against its checkpoint."""
    model_ref = model_store(cfg).get(tag)
    model, encoder, payload = load_checkpoint(Path(model_ref.path_of(CHECKPOINT_FILE)))
    if model_ref.info.labels.get("model_version") != payload["model_version"]:
        raise VersionMismatch(f"{tag}: label {model_ref.info.labels.get('model_version')!r} but checkpoint "
                              f"{payload['model_version']!r}")
    return model, encoder, payload


# --- checkpoints ---------------------------------------------------------------------------------------------


def load_checkpoint(path: Path):
    """(model in eval mode, encoder, payload) from a ``retrieval train`` checkpoint."""
    import torch

    from training.encoding import Encoder
    from training.train import build_model

    payload = torch.load(path, map_location="cpu", weights_only=False)
    known = {f.name for f in fields(TrainConfig)}
    tc = TrainConfig(**{k: v for k, v in payload["config"].items() if k in known})
    encoder = Encoder.from_state(payload["encoder"])
    model = build_model(encoder, tc)
    model.load_state_dict(payload["model"])
    model.eval()
    return model, encoder, payload


def latest_checkpoint(cfg: Config) -> Path:
    found = sorted((cfg.data_path / "models").glob(f"*/{CHECKPOINT_FILE}"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no checkpoint under {cfg.data_path / 'models'}: run `retrieval train`")
    return found[-1]


# --- publish / rollback / recover ---------------------------------------------------------------------------


def pause_point(name: str) -> None:
    """Crash-test hook: when $RETRIEVAL_PAUSE_AT == name, announce it and sleep until killed."""
    if os.environ.get(PAUSE_ENV) == name:
        print(f"paused at {name}", file=sys.stderr, flush=True)
        time.sleep(3600)


def sample_users(cfg: Config, model, encoder, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(user vectors, each user's top interest or -1) for ``n`` sampled users of the live snapshot, from the
    online store through ``user_tower_v1`` (what the service will feed the tower)."""
    import torch

    from feature_repo.feature_services import USER_TOWER_SERVICE
    from training.data.snapshot import load_live
    from training.features import online_features

    ids = pd.read_parquet(load_live(cfg).table("user_profile"), columns=["user_id"])["user_id"].unique()
    ids = np.random.default_rng(seed).choice(ids, size=min(n, len(ids)), replace=False)
    feats = online_features(cfg, USER_TOWER_SERVICE, "user_id", ids)
    with torch.no_grad():
        vectors = model.user_tower(encoder.users(feats)).numpy()
    top = feats["top_interest_ids"].map(lambda v: int(v[0]) if v is not None and len(v) else -1).to_numpy()
    return vectors.astype(np.float32), top


def _recall_ok(result: dict[str, Any], min_recall: float) -> bool:
    """Verification passes when both the unfiltered and the filtered recall reach ``min_recall``."""
    return min(result["recall"], result.get("filtered_recall", 1.0)) >= min_recall


def _verify_with_escalation(client, name: str, emb: PinEmbeddings, queries: np.ndarray, interests: np.ndarray,
                            cfg: Config, info: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Verify; while recall is short of ``index.min_recall``, double nprobe (up to nlist) or ef, 3 times at most."""
    params = dict(info["search_params"])
    knob = "nprobe" if "nprobe" in params else "ef" if "ef" in params else None
    cap = info["build_params"].get("nlist", 1 << 16)
    raises = 0
    while True:
        result = verify(client, name, emb, queries, cfg.index, params, query_interests=interests)
        log.info("verify %s with %s: recall@%d %.4f, filtered %.4f", name, params, result["k"], result["recall"],
                 result.get("filtered_recall", float("nan")))
        if _recall_ok(result, cfg.index.min_recall) or knob is None or raises == 3 or params[knob] >= cap:
            return result, params
        params[knob] = min(params[knob] * 2, cap)
        raises += 1


def publish(cfg: Config, checkpoint: Path | None = None, embeddings: PinEmbeddings | None = None) -> dict[str, Any]:
    """Build, verify and switch to the release of ``checkpoint`` (default: the newest one). ``embeddings``:
    pins already embedded by this checkpoint's pin tower (default: embed the live serving corpus)."""
    import torch

    reg = Registry(cfg)
    store = IndexStore(cfg)
    ic = cfg.index
    with reg.lock():
        cleaned = _recover(cfg, reg, store)
        path = checkpoint or latest_checkpoint(cfg)
        model, encoder, payload = load_checkpoint(path)
        version = payload["model_version"]
        state = reg.state()
        if version in state["history"]:
            raise ReleaseError(f"model version {version} is already published; `retrieval release rollback` "
                               "or train a new version")
        name = store.collection_name(version)
        t0 = time.perf_counter()
        pause_point("embed")
        torch.set_num_threads(max(1, cfg.train.threads))
        emb = (embed_corpus(cfg, model, encoder) if embeddings is None else embeddings).validated()
        t_embed = time.perf_counter() - t0
        tag = f"{USER_TOWER_MODEL}:{version}"
        meta = {"model_version": version, "user_tower": tag, "feature_services": payload["feature_services"],
                "snapshot_id": payload["snapshot_id"], "created_at": datetime.now(UTC).isoformat(timespec="seconds")}
        try:
            with store.client(name) as client:
                pause_point("create")
                info = build_collection(client, name, emb, meta, ic, on_progress=lambda n: pause_point("insert"))
                rows = row_count(client, name)
                if rows != len(emb):
                    raise IndexBuildError(f"{name}: {rows} rows after flush, expected {len(emb)}")
                check_pair(version, name, collection_metadata(client, name))
                queries, interests = sample_users(cfg, model, encoder, ic.verify_queries, seed=cfg.train.seed)
                verification, params = _verify_with_escalation(client, name, emb, queries, interests, cfg, info)
                info["search_params"] = params
                info["verification"] = verification
                if not _recall_ok(verification, ic.min_recall):
                    raise IndexBuildError(f"{name}: ANN recall@{verification['k']} {verification['recall']:.3f} "
                                      f"(filtered {verification.get('filtered_recall', float('nan')):.3f}) is below "
                                      f"index.min_recall {ic.min_recall} even with {params}")
            pause_point("tower")
            save_user_tower(cfg, path, version, name, meta)
            release = Release(
                model_version=version, collection=name, index_uri=store.uri(name), alias=ic.alias, user_tower=tag,
                feature_services=list(payload["feature_services"]), snapshot_id=payload["snapshot_id"],
                as_of=str(payload.get("as_of", "")), metrics=dict(payload.get("metrics", {})),
                index={**info, "embed_seconds": round(t_embed, 3),
                       "publish_seconds": round(time.perf_counter() - t0, 3)},
                created_at=meta["created_at"])
            reg.save_record(release)
        except BaseException:
            store.drop(name)
            _delete_tower(cfg, version)
            (reg.dir / f"{version}.json").unlink(missing_ok=True)
            raise
        pause_point("switch")
        if not store.embedded:
            _point_alias(store, name)
        previous = state["live"]
        reg.write_state({"live": version, "history": [*state["history"], version],
                         "previous": [*state["previous"], previous] if previous else state["previous"]})
        log.info("release %s is live (collection %s, previous %s)", version, name, previous)
        pruned = _prune(cfg, reg, store)
    return {"live": version, "previous": previous, "collection": name, "user_tower": tag,
            "rows": info["rows"], "verification": info["verification"], "search_params": info["search_params"],
            "seconds": release.index["publish_seconds"], "cleaned": cleaned, "pruned": pruned}


def rollback(cfg: Config) -> dict[str, Any]:
    """Make the release that was live before the live one live again."""
    reg = Registry(cfg)
    store = IndexStore(cfg)
    with reg.lock():
        state = reg.state()
        live, previous = state["live"], [v for v in state["previous"] if v in state["history"]]
        if live is None:
            raise ReleaseError("nothing is live: publish a release first")
        if not previous:
            raise ReleaseError(f"no release was live before {live} (or it was pruned): nothing to roll back to")
        target = previous.pop()
        release = reg.record(target)
        if not store.embedded:   # embedded: the service may hold the database open; it checks the pair on load
            check_pair(target, release.collection, store.metadata(release.collection))
            _point_alias(store, release.collection)
        reg.write_state({"live": target, "history": state["history"], "previous": previous})
        log.info("rolled back from %s to %s", live, target)
    return {"live": target, "rolled_back": live, "collection": release.collection}


def recover(cfg: Config) -> dict[str, Any]:
    """Delete what interrupted publishes left behind and re-point the alias at the live collection."""
    reg = Registry(cfg)
    with reg.lock():
        return _recover(cfg, reg, IndexStore(cfg))


def status(cfg: Config) -> dict[str, Any]:
    reg = Registry(cfg)
    state = reg.state()
    out = []
    for v in state["history"]:
        r = reg.record(v)
        out.append({"model_version": v, "live": v == state["live"], "collection": r.collection,
                    "rows": r.index.get("rows"), "recall": r.index.get("verification", {}).get("recall"),
                    "created_at": r.created_at})
    return {"live": state["live"], "releases": out}


def _recover(cfg: Config, reg: Registry, store: IndexStore) -> dict[str, list[str]]:
    state = reg.state()
    kept = set(state["history"])
    keep_collections = {store.collection_name(v) for v in kept}
    cleaned: dict[str, list[str]] = {"collections": [], "user_towers": [], "records": []}
    for name in store.collections():
        if name not in keep_collections:
            store.drop(name)
            cleaned["collections"].append(name)
    for version in user_tower_models(cfg):
        if version not in kept:
            _delete_tower(cfg, version)
            cleaned["user_towers"].append(version)
    for version in reg.records():
        if version not in kept:
            (reg.dir / f"{version}.json").unlink(missing_ok=True)
            cleaned["records"].append(version)
    for tmp in reg.dir.glob(".*.json.*"):
        tmp.unlink(missing_ok=True)
    if state["live"] and not store.embedded:
        _point_alias(store, store.collection_name(state["live"]))
    if any(cleaned.values()):
        log.warning("recovered from an interrupted publish: %s", cleaned)
    return cleaned


def _prune(cfg: Config, reg: Registry, store: IndexStore) -> list[str]:
    state = reg.state()
    history = state["history"]
    n = cfg.index.keep_releases
    keep = set(history[-n:]) | {state["live"]} | set(state["previous"][-1:])   # newest, live, rollback target
    gone = [v for v in history if v not in keep]
    if not gone:
        return []
    reg.write_state({"live": state["live"], "history": [v for v in history if v in keep],
                     "previous": [v for v in state["previous"] if v in keep]})
    for v in gone:
        store.drop(store.collection_name(v))
        _delete_tower(cfg, v)
        (reg.dir / f"{v}.json").unlink(missing_ok=True)
    log.info("pruned releases %s", gone)
    return gone


def _delete_tower(cfg: Config, version: str) -> None:
    try:
        model_store(cfg).delete(f"{USER_TOWER_MODEL}:{version}")
    except Exception:  # noqa: BLE001 - absent, or half-written by a killed publish: remove the files
        shutil.rmtree(bentoml_home(cfg) / "models" / USER_TOWER_MODEL / version, ignore_errors=True)


def _point_alias(store: IndexStore, collection: str) -> None:
    """Server mode: make ``index.alias`` name ``collection``."""
    alias = store.ic.alias
    with store.client(collection) as c:
        try:
            current = c.describe_alias(alias).get("collection_name")
        except Exception:  # noqa: BLE001 - the alias does not exist yet
            current = None
        if current is None:
            c.create_alias(collection, alias)
        elif current != collection:
            c.alter_alias(collection, alias)
