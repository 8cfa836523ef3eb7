"""Stage: Feast. Loads the store for a data dir, applies the definitions in feature_repo/, materializes
the online store, and reads point-in-time features offline through the feature services.

The store's types come from feature_store.yaml; only paths (and the online store, for Redis) are
overridden from the typed config, so the YAML stays the one description of the Feast deployment.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from training.config import REPO_ROOT, Config

log = logging.getLogger(__name__)

FEATURE_STORE_YAML = REPO_ROOT / "feature_store.yaml"
_REPO_MODULES = ("feature_repo.entities", "feature_repo.data_sources", "feature_repo.feature_views",
                 "feature_repo.feature_services")


def repo_config(cfg: Config):
    """feature_store.yaml with the registry and online-store paths moved under ``cfg.data_dir``."""
    from feast.repo_config import RepoConfig

    raw = yaml.safe_load(os.path.expandvars(FEATURE_STORE_YAML.read_text()))
    feast_dir = cfg.data_path / "feast"
    feast_dir.mkdir(parents=True, exist_ok=True)
    raw["registry"] = str(feast_dir / "registry.db")
    if cfg.features.online_store == "redis":
        raw["online_store"] = {"type": "redis", "connection_string": cfg.features.redis_connection}
    else:
        raw["online_store"] = {**raw["online_store"], "path": str(feast_dir / "online.db")}
    rc = RepoConfig(**raw)
    rc.repo_path = REPO_ROOT
    return rc


def get_store(cfg: Config):
    from feast import FeatureStore

    return FeatureStore(config=repo_config(cfg))


def definitions(cfg: Config) -> list[Any]:
    """The Feast objects of feature_repo/, with sources pointing at ``cfg.data_dir``."""
    want = str(cfg.data_path)
    loaded = sys.modules.get("feature_repo.data_sources")
    os.environ["RETRIEVAL_DATA_DIR"] = want
    if loaded is not None and str(loaded.DATA_DIR) != want:
        for name in _REPO_MODULES:  # same process, other data dir (tests): rebuild the declarative objects
            importlib.reload(importlib.import_module(name))
    entities = importlib.import_module("feature_repo.entities")
    views = importlib.import_module("feature_repo.feature_views")
    services = importlib.import_module("feature_repo.feature_services")
    return [entities.user, entities.pin, views.user_profile, views.user_sequence, views.user_features,
            views.pin_profile, views.pin_features,
            services.user_tower_v1, services.pin_tower_v1]


def apply(cfg: Config) -> None:
    objects = definitions(cfg)
    get_store(cfg).apply(objects)
    log.info("feast apply: %d objects (%s)", len(objects), ", ".join(o.name for o in objects))


def _state_path(cfg: Config) -> Path:
    return cfg.data_path / "feast" / "online_state.json"


def materialize(cfg: Config, as_of: datetime, snapshot_id: str) -> dict[str, Any]:
    """Bring the online store up to ``as_of`` (the data's clock, not the wall clock).

    Incremental when the online store already holds this snapshot; a full rebuild (teardown, apply,
    materialize the TTL window) when it holds another one, so no entity of an old snapshot lingers.
    """
    import time

    store = get_store(cfg)
    state_file = _state_path(cfg)
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    end = as_of + timedelta(seconds=1)
    t0 = time.perf_counter()
    if state.get("snapshot_id") == snapshot_id:
        mode = "incremental"
        store.materialize_incremental(end_date=end)
    else:
        mode = "full"
        objects = definitions(cfg)
        store.teardown()
        store = get_store(cfg)
        store.apply(objects)
        materialize_all(store, as_of)
    seconds = time.perf_counter() - t0
    state = {"snapshot_id": snapshot_id, "as_of": as_of.isoformat(), "mode": mode, "seconds": round(seconds, 3)}
    state_file.write_text(json.dumps(state, indent=2))
    log.info("feast materialize (%s) to %s in %.1fs", mode, end.isoformat(), seconds)
    return state


def materialize_all(store, as_of: datetime) -> None:
    """Materialize every feature view over its whole TTL window ending at ``as_of`` (views without a TTL:
    all history). Values older than the TTL are expired offline, so they must not reach the online store."""
    end = as_of + timedelta(seconds=1)
    for view in store.list_feature_views():
        start = as_of - view.ttl if view.ttl else datetime(1970, 1, 1, tzinfo=UTC)
        store.materialize(start_date=start, end_date=end, feature_views=[view.name])


def feature_refs(store, *service_names: str) -> list[str]:
    """'view:feature' references of the given feature services, in service order."""
    refs: list[str] = []
    for name in service_names:
        for proj in store.get_feature_service(name).feature_view_projections:
            refs += [f"{proj.name_to_use()}:{f.name}" for f in proj.features]
    return refs


def historical_features(cfg: Config, entity_df: pd.DataFrame, *service_names: str) -> pd.DataFrame:
    """Point-in-time join of ``entity_df`` (keys + event_timestamp) through the feature services."""
    store = get_store(cfg)
    refs = feature_refs(store, *service_names)
    return store.get_historical_features(entity_df=entity_df, features=refs).to_df()


def online_features(cfg: Config, service_name: str, key: str, ids) -> pd.DataFrame:
    """Online values of one feature service for entity ``key`` = each of ``ids`` (one row per id, in order)."""
    store = get_store(cfg)
    rows = [{key: int(i)} for i in ids]
    resp = store.get_online_features(features=store.get_feature_service(service_name), entity_rows=rows)
    return pd.DataFrame(resp.to_dict())
