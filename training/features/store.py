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
import io
import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
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
        # last writer wins, as with SQLite: the event log orders the real-time pushes (one pusher at a time), and
        # Feast's Redis store would otherwise drop a push whose row time equals the stored one (a late event below
        # the newest changes the sequence, not its time)
        raw["online_store"] = {"type": "redis", "connection_string": cfg.features.redis_connection,
                               "skip_dedup": True}
    else:
        raw["online_store"] = {**raw["online_store"], "path": str(feast_dir / "online.db")}
        if busy_timeout is not None:
            raw["online_store"]["busy_timeout_seconds"] = busy_timeout
    rc = RepoConfig(**raw)
    rc.repo_path = REPO_ROOT
    return rc


def definitions(cfg: Config) -> list[Any]:
    """The Feast objects of feature_repo/, with every parquet source under ``cfg.data_dir``."""
    from feast import PushSource

    from feature_repo import entities, feature_services, feature_views
    from feature_repo.data_sources import dbt_table

    views = []
    for view in feature_views.FEATURE_VIEWS:
        moved = copy.copy(view)
        moved.batch_source = dbt_table(view.batch_source.tags["dbt_model"], cfg.data_path)
        if view.stream_source is not None:   # a push source writes the same view online in real time
            push = view.stream_source
            moved.stream_source = PushSource(name=push.name, batch_source=moved.batch_source, tags=push.tags)
        views.append(moved)
    return [*entities.ENTITIES, *views, *feature_services.FEATURE_SERVICES]


class Features:
    """One Feast ``FeatureStore`` of a data dir and what the project does with it."""

    def __init__(self, cfg: Config, busy_timeout: float | None = None):
        self.cfg = cfg
        self.busy_timeout = busy_timeout
        self._services: dict[str, Any] = {}
        self._push_views: dict[str, list[str]] = {}
        self.store = self._open()

    def _open(self):
        from feast import FeatureStore

        self._services.clear()
        self._push_views.clear()
        return FeatureStore(config=repo_config(self.cfg, self.busy_timeout))

    # --- definitions and the online store ----------------------------------------------------------------------
    def apply(self, level: int = logging.INFO) -> None:
        objects = definitions(self.cfg)
        self.store.apply(objects)
        self._services.clear()
        log.log(level, "feast apply: %d objects (%s)", len(objects), ", ".join(o.name for o in objects))

    def materialize(self, as_of: datetime, snapshot_id: str, lineage: dict[str, Any] | None = None) -> dict[str, Any]:
        """Bring the online store up to ``as_of`` (the data's clock, not the wall clock).

        Incremental (``materialize_incremental``: only rows newer than what each view already holds are written)
        when the online store holds this snapshot, or an earlier snapshot of the same ``lineage`` (the source and
        the contract and transform config that computed it: a snapshot that only adds newer data, as a retrain's
        does); the state records how many feature rows the new interval holds. Otherwise a full rebuild
        (teardown, apply, materialize the TTL window), so no entity of an unrelated snapshot lingers, as when the
        data dir now points at another online store (e.g. a new Redis), which holds nothing yet.
        """
        state_file = self.cfg.data_path / "feast" / "online_state.json"
        state = json.loads(state_file.read_text()) if state_file.exists() else {}
        end = as_of + timedelta(seconds=1)
        t0 = time.perf_counter()
        target = "redis://" + self.cfg.features.redis_connection if self.cfg.features.online_store == "redis" \
            else "sqlite"
        same_store = state.get("online_store", "sqlite") == target
        continues = (lineage is not None and state.get("lineage") == json.loads(json.dumps(lineage, default=str))
                     and "as_of" in state and datetime.fromisoformat(state["as_of"]) <= as_of)
        written: dict[str, int] | None = None
        expired: dict[str, int] | None = None
        if same_store and (state.get("snapshot_id") == snapshot_id or continues):
            mode = "incremental"
            previous = datetime.fromisoformat(state["as_of"]) if "as_of" in state else None
            written = self._rows_between(previous + timedelta(seconds=1), end) if previous is not None else None
            with feast_console():
                self.store.materialize_incremental(end_date=end)
            expired = self._expire(previous, as_of) if previous is not None else None
        else:
            mode = "full"
            self.store.teardown()
            self.store = self._open()   # the torn-down store's registry cache is gone with it
            self.apply(logging.DEBUG)   # the same definitions the stage has just applied
            with feast_console():
                materialize_all(self.store, as_of)
        seconds = time.perf_counter() - t0
        state = {"snapshot_id": snapshot_id, "as_of": as_of.isoformat(), "mode": mode, "seconds": round(seconds, 3),
                 "online_store": target, "lineage": lineage, "rows_written": written, "expired": expired}
        atomic_write_text(state_file, json.dumps(state, indent=2, default=str))
        log.info("feast materialize (%s) to %s in %.1fs%s", mode, end.isoformat(), seconds,
                 f": {sum(written.values()):,} new feature rows" if written else "")
        return state

    def _expire(self, previous: datetime, as_of: datetime) -> dict[str, int]:
        """After an incremental materialize from ``previous`` to ``as_of``: the entities whose newest value was within
        a view's TTL at ``previous`` but is older than the TTL at ``as_of`` get a null value online (a tombstone, as
        of ``as_of``), as a point-in-time lookup at ``as_of`` returns null for them. Online stores keep a value
        until it is overwritten (SQLite has no TTL on reads), so without this an incremental materialize would
        serve expired values that a full one leaves out."""
        import duckdb

        out = {}
        with duckdb.connect() as con:
            for view in self.store.list_feature_views():
                if not view.ttl or as_of - view.ttl <= previous - view.ttl:
                    continue
                keys = [e.name for e in view.entity_columns]
                key_list = ", ".join(keys)
                expired = con.execute(
                    f"select {key_list} from read_parquet('{view.batch_source.path}') where event_timestamp <= ? "
                    f"group by {key_list} having max(event_timestamp) >= ? and max(event_timestamp) < ?",
                    [as_of, previous - view.ttl, as_of - view.ttl]).df()
                out[view.name] = len(expired)
                if len(expired):
                    tomb = expired.assign(event_timestamp=pd.Timestamp(as_of))
                    for f in view.features:
                        tomb[f.name] = None
                    # FeatureStore.write_to_online_store drops an all-null frame; the provider's ingest writes it
                    self.store._get_provider().ingest_df(view, tomb)
        return out

    def _rows_between(self, start: datetime, end: datetime) -> dict[str, int]:
        """Feature rows of each view with ``start <= event_timestamp < end``: what an incremental materialize of
        that interval writes."""
        import duckdb

        out = {}
        with duckdb.connect() as con:
            for view in self.store.list_feature_views():
                out[view.name] = con.execute(
                    f"select count(*) from read_parquet('{view.batch_source.path}') "
                    "where event_timestamp >= ? and event_timestamp < ?", [start, end]).fetchone()[0]
        return out

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

    def historical(self, entity_df: pd.DataFrame, *service_names: str, chunk: int | None = None) -> pd.DataFrame:
        """Point-in-time join of ``entity_df`` (keys + event_timestamp) through the feature services, one Feast
        call per ``chunk`` (default ``features.historical_chunk_rows``) entity rows in time order (the rows come
        back in that order, not ``entity_df``'s)."""
        chunk = chunk or self.cfg.features.historical_chunk_rows
        if len(entity_df) <= chunk:
            refs = self.feature_refs(*service_names)
            return self.store.get_historical_features(entity_df=entity_df, features=refs).to_df()
        return pd.concat(self.historical_parts(entity_df, *service_names, chunk=chunk), ignore_index=True)

    def historical_parts(self, entity_df: pd.DataFrame, *service_names: str,
                         chunk: int | None = None) -> Iterator[pd.DataFrame]:
        """The point-in-time join of ``historical``, one part per ``chunk`` (default
        ``features.historical_chunk_rows``) entity rows in time order (ties in ``entity_df``'s order), so a caller
        can write each part before the next is joined."""
        refs = self.feature_refs(*service_names)
        chunk = chunk or self.cfg.features.historical_chunk_rows
        ordered = entity_df.sort_values("event_timestamp", kind="stable")
        for i in range(0, len(ordered), chunk):
            yield self.store.get_historical_features(entity_df=ordered.iloc[i:i + chunk], features=refs).to_df()

    def online(self, service_name: str, key: str, ids) -> dict[str, list]:
        """Online values of one feature service for entity ``key`` = each of ``ids``: column -> one value per id,
        in order (None where the store has nothing)."""
        rows = [{key: int(i)} for i in ids]
        return self.store.get_online_features(features=self.service(service_name), entity_rows=rows).to_dict()

    def push(self, source: str, rows: pd.DataFrame) -> None:
        """Write ``rows`` (entity key, event_timestamp, the view's features) to the online store of every feature
        view the push source ``source`` feeds, as Feast's ``FeatureStore.push(..., to=PushMode.ONLINE)`` does (online
        only: the batch path recomputes the same rows from the event log). The views are looked up in the registry
        once, not per call: that lookup converts every view and service from protobuf and was most of a push's time
        (22 of 53 ms per 10-user push, measured with cProfile)."""
        views = self._push_views.get(source)
        if views is None:
            views = [v.name for v in self.store.list_feature_views(allow_cache=True)
                     if v.stream_source is not None and v.stream_source.name == source]
            if not views:
                raise ValueError(f"no feature view is fed by the push source {source!r}")
            self._push_views[source] = views
        for name in views:
            self.store.write_to_online_store(name, rows, allow_registry_cache=True)

    def online_frame(self, service_name: str, key: str, ids) -> pd.DataFrame:
        return pd.DataFrame(self.online(service_name, key, ids))


@contextmanager
def feast_console() -> Iterator[None]:
    """Feast's materialize prints a banner per view, in ANSI colours, to stdout; the stage logs one summary line
    instead, and the banners go to the debug log (``retrieval -v``)."""
    buffer = io.StringIO()
    with redirect_stdout(buffer):
        yield
    text = re.sub(r"\x1b\[[0-9;]*m", "", buffer.getvalue()).strip()
    if text:
        log.debug("feast: %s", " ".join(text.split()))


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
