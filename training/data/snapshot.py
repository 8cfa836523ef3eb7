"""Data snapshots: build into a scratch folder, verify, then switch the live pointer atomically.

Layout under ``<data_dir>``::

    raw/                         source output (synthetic generator or MovieLens ingest), and
                                 ingested_events.parquet: the service's event log, exported by each build
    events/ingest.db             the service's event log (POST /events; training/features/realtime.py)
    build/                       the build in progress (contracts + dbt); wiped at the start of a build
    snapshots/<id>-<utc time>/   finished builds: staged/, quarantine/, tables/*.parquet, warehouse.duckdb,
                                 manifest.json (the newest ``transform.keep_snapshots`` are kept)
    live -> snapshots/...        symlink, replaced atomically (rename) only after a build fully succeeded
    dev/                         where a plain ``dbt build`` from the repo root writes (dbt_project/profiles.yml)

The snapshot id is a content hash of the raw files, the contract and transform config, the data stage's end
(``data.until``), and the dbt project's code: the same input always gets the same id. A crashed or failed build
never touches ``live``; the next build removes its leftovers.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb

from training.config import Config
from training.data.contracts import INGESTED_EVENTS, validate_raw
from training.data.dbt import DBT_DIR, run_dbt, until_var, warehouse_config
from training.data.raw import OPTIONAL_TABLES, TABLES
from training.features.realtime import export as export_ingested
from training.io import atomic_symlink

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FEATURE_TABLES = ("user_profile", "user_sequence", "user_features", "user_impressions", "pin_profile", "pin_features")
MART_TABLES = ("fct_engagements", "fct_pretrain_engagements", "pin_engagement_decayed", "serving_corpus",
               "pin_canonical_map")


@dataclass
class Snapshot:
    path: Path
    manifest: dict[str, Any]

    @property
    def id(self) -> str:
        return self.manifest["snapshot_id"]

    @property
    def as_of(self) -> datetime:
        return datetime.fromisoformat(self.manifest["as_of"])

    def table(self, name: str) -> Path:
        return self.path / "tables" / f"{name}.parquet"

    @property
    def lineage(self) -> dict[str, Any]:
        """What computed the snapshot's tables (source, contract and transform config, the dbt code), without the
        data's end: a later cut (``data.until``) or a continuation of the same lineage only adds newer rows, so the
        stages after the build (Feast materialize, the training set) can add only the new interval."""
        config = {k: v for k, v in (self.manifest.get("config") or {}).items() if k != "until"}
        return json.loads(json.dumps({"source": self.manifest.get("source"), "config": config,
                                      "dbt_code": self.manifest.get("dbt_code")}, default=str))

    def history_digest(self, end: datetime) -> str:
        """A digest of the staged inputs as of ``end``: every interest, and the users, pins, events and follows
        whose own time is at or before ``end`` (order-independent, computed by DuckDB without loading the tables).
        Two snapshots of one lineage with the same digest computed the same feature values for every instant up to
        ``end``."""
        times = {"interests": None, "users": "signup_at", "pins": "created_at", "events": "event_timestamp",
                 "user_follows": "followed_at"}
        parts = []
        with duckdb.connect() as con:
            for table, column in times.items():
                path = self.path / "staged" / f"{table}.parquet"
                if not path.exists():
                    parts.append(f"{table}:-")
                    continue
                names = [d[0] for d in con.execute(f"select * from read_parquet('{path}') limit 0").description]
                row = ", ".join(f'"{n}"' for n in names)
                where, args = (f'where "{column}" <= ?', [end]) if column in names else ("", [])
                n, h = con.execute(f"select count(*), coalesce(sum(hash({row})::hugeint), 0) "
                                   f"from read_parquet('{path}') {where}", args).fetchone()
                parts.append(f"{table}:{n}:{h}")
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def raw_dir(cfg: Config) -> Path:
    return cfg.data_path / "raw"


def live_path(cfg: Config) -> Path:
    return cfg.data_path / "live"


def _hash_files(h: hashlib._Hash, paths: list[Path], root: Path) -> None:
    for p in sorted(paths):
        h.update(str(p.relative_to(root)).encode())
        with p.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)


def _dbt_code() -> list[Path]:
    return [p for p in DBT_DIR.rglob("*") if p.suffix in (".sql", ".yml") and "target" not in p.parts]


def dbt_code_digest() -> str:
    """Content hash of the dbt project's models and configuration (what computes the tables from the staged data)."""
    h = hashlib.sha256()
    _hash_files(h, _dbt_code(), DBT_DIR)
    return h.hexdigest()[:16]


def snapshot_id(cfg: Config) -> str:
    """Content hash of everything a build depends on."""
    h = hashlib.sha256()
    raw = raw_dir(cfg)
    names = TABLES + OPTIONAL_TABLES + (INGESTED_EVENTS,)
    _hash_files(h, [raw / f"{t}.parquet" for t in names if (raw / f"{t}.parquet").exists()], raw)
    _hash_files(h, _dbt_code(), DBT_DIR)
    h.update(json.dumps({"contracts": cfg.contracts.rules(), "transform": cfg.transform.dbt_vars(),
                         "until": until_var(cfg)}, sort_keys=True).encode())
    return h.hexdigest()[:12]


@contextmanager
def build_lock(cfg: Config):
    """One build at a time per data dir (the build folder and dbt target are shared)."""
    cfg.data_path.mkdir(parents=True, exist_ok=True)
    with open(cfg.data_path / ".build.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise RuntimeError(f"another data-stage build is running on {cfg.data_path}") from e
        yield


def _table_rows(path: Path) -> int:
    """Rows with a key. dbt-duckdb writes an empty model as one all-null row; that counts as empty."""
    con = duckdb.connect()
    key = con.execute(f"select * from read_parquet('{path}') limit 0").description[0][0]
    return con.execute(f"select count({key}) from read_parquet('{path}')").fetchone()[0]


def build(cfg: Config) -> Snapshot:
    """Contracts + dbt build into a fresh folder, then rename it to a finished snapshot (not yet live)."""
    with build_lock(cfg):
        ingested = export_ingested(cfg, raw_dir(cfg) / f"{INGESTED_EVENTS}.parquet")
        if ingested is not None:
            log.info("event log: %s ingested events (through log sequence %d) exported for the build",
                     f"{ingested[0]:,}", ingested[1])
        sid = snapshot_id(cfg)
        scratch = cfg.data_path / "build"
        if scratch.exists():
            log.info("removing leftovers of an interrupted build: %s", scratch)
            shutil.rmtree(scratch)
        scratch.mkdir(parents=True)
        t0 = time.perf_counter()
        reports = validate_raw(raw_dir(cfg), scratch, cfg.contracts)
        t_contracts = time.perf_counter() - t0
        dbt = run_dbt("build", cfg, scratch)
        # dbt-duckdb keeps the database open in-process: connect with its configuration
        with duckdb.connect(str(scratch / "warehouse.duckdb"), config=warehouse_config(cfg, scratch)) as con:
            as_of = con.execute("select as_of from int_data_window").fetchone()[0]
            con.execute("checkpoint")
        rows = {name: _table_rows(scratch / "tables" / f"{name}.parquet") for name in FEATURE_TABLES + MART_TABLES}
        for name in FEATURE_TABLES + MART_TABLES:
            if rows[name] == 0:
                raise RuntimeError(f"dbt produced an empty {name} table in {scratch}: nothing to serve or train on")
        manifest = {
            "snapshot_id": sid,
            "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "as_of": as_of.astimezone(UTC).isoformat(),
            "source": cfg.data.source,
            "config": {"contracts": cfg.contracts.rules(), "transform": cfg.transform.dbt_vars(),
                       "until": until_var(cfg)},
            "dbt_code": dbt_code_digest(),
            "contracts": {t: vars(r) for t, r in reports.items()},
            "rows": rows,
            "ingested_through_seq": ingested[1] if ingested else 0,
            "seconds": {"contracts": round(t_contracts, 3), "dbt_build": round(dbt.seconds, 3)},
            "dbt_nodes": dbt.timings,
        }
        (scratch / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
        final = cfg.data_path / "snapshots" / f"{sid}-{datetime.now(UTC):%Y%m%dT%H%M%S%f}"
        final.parent.mkdir(parents=True, exist_ok=True)
        os.rename(scratch, final)
        log.info("snapshot %s built in %.1fs: %s", sid, time.perf_counter() - t0,
                 ", ".join(f"{k} {v:,}" for k, v in rows.items()))
        return Snapshot(final, manifest)


def switch_live(cfg: Config, snap: Snapshot) -> None:
    """Point ``live`` at the snapshot with one atomic rename, then drop old snapshots."""
    atomic_symlink(snap.path, live_path(cfg))
    log.info("live -> %s", snap.path.name)
    (cfg.data_path / "dev" / "tables").mkdir(parents=True, exist_ok=True)   # a plain `dbt build` writes here
    _gc(cfg, keep=snap.path)


def _gc(cfg: Config, keep: Path) -> None:
    snaps = sorted((p for p in (cfg.data_path / "snapshots").iterdir() if p.is_dir()), key=lambda p: p.name[13:])
    finished = [p for p in snaps if (p / MANIFEST).exists()]
    for p in snaps:
        if p not in finished[-cfg.transform.keep_snapshots:] and p.resolve() != keep.resolve():
            shutil.rmtree(p, ignore_errors=True)


def load_live(cfg: Config) -> Snapshot:
    link = live_path(cfg)
    if not link.exists():
        raise FileNotFoundError(f"no live data snapshot under {cfg.data_path}: run `retrieval run` (or `make run`)")
    path = link.resolve()
    return Snapshot(path, json.loads((path / MANIFEST).read_text()))
