"""Feast for a data dir: one ``FeatureStore`` that applies, materializes, and serves point-in-time (offline) and
online fetches through the feature services.

The store's types come from feature_store.yaml; only paths (and the online store, for Redis) are overridden
from the typed config, so the YAML stays the one description of the Feast deployment. The declarative
objects are feature_repo/'s; their parquet sources point at the checkout's ``.data`` (what a plain
``feast apply`` registers) and are re-rooted here at ``cfg.data_dir`` (``definitions``), without touching
the environment or reloading modules. Training, publishing and the service all read features through
``feature_store(cfg)``: one store per data dir and process, built once.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pandas as pd
import yaml

from training.config import REPO_ROOT, Config
from training.io import atomic_write_text

log = logging.getLogger(__name__)

FEATURE_STORE_YAML = REPO_ROOT / "feature_store.yaml"


def repo_config(cfg: Config, busy_timeout: float | None = None):
    """feature_store.yaml with the registry and online-store paths moved under ``cfg.data_dir`` (and, for the bulk
    SQLite store, ``busy_timeout`` as its lock wait)."""
    from feast.repo_config import RepoConfig

    raw = yaml.safe_load(os.path.expandvars(FEATURE_STORE_YAML.read_text()))
    feast_dir = cfg.data_path / "feast"
    feast_dir.mkdir(parents=True, exist_ok=True)
    raw["registry"] = str(feast_dir / "registry.db")
    if cfg.features.online_store == "redis":
        raw["online_store"] = {"type": "redis", "connection_string": cfg.features.redis_connection}
    else:
        raw["online_store"] = {**raw["online_store"], "path": str(feast_dir / "online.db")}
        if busy_timeout is not None:
            raw["online_store"]["busy_timeout_seconds"] = busy_timeout
    rc = RepoConfig(**raw)
    rc.repo_path = REPO_ROOT
    return rc


def definitions(cfg: Config) -> list[Any]:
    """The Feast objects of feature_repo/, with every parquet source under ``cfg.data_dir``."""
    from feature_repo import entities, feature_services, feature_views
    from feature_repo.data_sources import dbt_table

    views = []
    for view in feature_views.FEATURE_VIEWS:
        moved = copy.copy(view)
        moved.batch_source = dbt_table(view.batch_source.tags["dbt_model"], cfg.data_path)
        views.append(moved)
    return [*entities.ENTITIES, *views, *feature_services.FEATURE_SERVICES]


class Features:
    """One Feast ``FeatureStore`` of a data dir and what the project does with it."""

    def __init__(self, cfg: Config, busy_timeout: float | None = None):
        self.cfg = cfg
        self.busy_timeout = busy_timeout
        self._services: dict[str, Any] = {}
        self.store = self._open()

    def _open(self):
        from feast import FeatureStore

        self._services.clear()
        return FeatureStore(config=repo_config(self.cfg, self.busy_timeout))

    # --- definitions and the online store ----------------------------------------------------------------------
    def apply(self) -> None:
        objects = definitions(self.cfg)
        self.store.apply(objects)
        self._services.clear()
        log.info("feast apply: %d objects (%s)", len(objects), ", ".join(o.name for o in objects))

    def materialize(self, as_of: datetime, snapshot_id: str) -> dict[str, Any]:
        """Bring the online store up to ``as_of`` (the data's clock, not the wall clock).

        Incremental when the online store already holds this snapshot; a full rebuild (teardown, apply,
        materialize the TTL window) when it holds another one, so no entity of an old snapshot lingers, or when
        the data dir now points at another online store (e.g. a new Redis), which holds nothing yet.
        """
        state_file = self.cfg.data_path / "feast" / "online_state.json"
        state = json.loads(state_file.read_text()) if state_file.exists() else {}
        end = as_of + timedelta(seconds=1)
        t0 = time.perf_counter()
        target = "redis://" + self.cfg.features.redis_connection if self.cfg.features.online_store == "redis" \
            else "sqlite"
        if state.get("snapshot_id") == snapshot_id and state.get("online_store", "sqlite") == target:
            mode = "incremental"
            self.store.materialize_incremental(end_date=end)
        else:
            mode = "full"
            self.store.teardown()
            self.store = self._open()   # the torn-down store's registry cache is gone with it
            self.apply()
            materialize_all(self.store, as_of)
        seconds = time.perf_counter() - t0
        state = {"snapshot_id": snapshot_id, "as_of": as_of.isoformat(), "mode": mode, "seconds": round(seconds, 3),
                 "online_store": target}
        atomic_write_text(state_file, json.dumps(state, indent=2))
        log.info("feast materialize (%s) to %s in %.1fs", mode, end.isoformat(), seconds)
        return state

    # --- reads ---------------------------------------------------------------------------------------------------
    def service(self, name: str):
        if name not in self._services:
            self._services[name] = self.store.get_feature_service(name)
        return self._services[name]

    def feature_refs(self, *service_names: str) -> list[str]:
        """'view:feature' references of the given feature services, in service order."""
        refs: list[str] = []
        for name in service_names:
            for proj in self.service(name).feature_view_projections:
                refs += [f"{proj.name_to_use()}:{f.name}" for f in proj.features]
        return refs

    def historical(self, entity_df: pd.DataFrame, *service_names: str) -> pd.DataFrame:
        """Point-in-time join of ``entity_df`` (keys + event_timestamp) through the feature services."""
        refs = self.feature_refs(*service_names)
        return self.store.get_historical_features(entity_df=entity_df, features=refs).to_df()

    def online(self, service_name: str, key: str, ids) -> dict[str, list]:
        """Online values of one feature service for entity ``key`` = each of ``ids``: column -> one value per id,
        in order (None where the store has nothing)."""
        rows = [{key: int(i)} for i in ids]
        return self.store.get_online_features(features=self.service(service_name), entity_rows=rows).to_dict()

    def online_frame(self, service_name: str, key: str, ids) -> pd.DataFrame:
        return pd.DataFrame(self.online(service_name, key, ids))


def materialize_all(store, as_of: datetime) -> None:
    """Materialize every feature view of a Feast ``FeatureStore`` over its whole TTL window ending at ``as_of``
    (views without a TTL: all history). Values older than the TTL are expired offline, so they must not reach
    the online store."""
    end = as_of + timedelta(seconds=1)
    for view in store.list_feature_views():
        start = as_of - view.ttl if view.ttl else datetime(1970, 1, 1, tzinfo=UTC)
        store.materialize(start_date=start, end_date=end, feature_views=[view.name])


_stores: dict[tuple, Features] = {}
_stores_lock = threading.Lock()


def feature_store(cfg: Config, busy_timeout: float | None = None) -> Features:
    """The ``Features`` of ``cfg``'s data dir and online store, built once per process (per lock wait)."""
    key = (str(cfg.data_path), cfg.features.online_store, cfg.features.redis_connection, busy_timeout)
    with _stores_lock:
        if key not in _stores:
            _stores[key] = Features(cfg, busy_timeout)
        return _stores[key]
