"""Stage: the point-in-time training set.

Engagement labels (dbt mart ``fct_engagements``) joined with Feast ``get_historical_features`` through
the user and pin feature services (``user_tower_v2``, ``pin_tower_v1``): each label gets the newest feature row at
or before its own timestamp, and since feature rows only summarize events strictly before their
timestamp, no label sees itself or the future. The result passes ``TRAINING_SET_SCHEMA`` before it is
written, with a manifest that ties it to the data snapshot and the feature services (by role), and records
the snapshot's interest ids.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from feature_repo.feature_services import SERVICES_BY_ROLE
from training.config import Config
from training.data.contracts import TRAINING_SET_SCHEMA
from training.data.snapshot import load_live
from training.features.store import feature_store
from training.io import atomic_write_parquet, atomic_write_text

log = logging.getLogger(__name__)

LABEL_COLUMNS = ["user_id", "pin_id", "event_timestamp", "event_type", "weight", "label"]


def training_set_path(cfg: Config) -> Path:
    return cfg.data_path / "training" / "training_set.parquet"


def build_training_set(cfg: Config) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Join the live snapshot's labels with point-in-time features; validate; write; return it."""
    snap = load_live(cfg)
    labels = pd.read_parquet(snap.table("fct_engagements"), columns=LABEL_COLUMNS)
    t0 = time.perf_counter()
    df = feature_store(cfg).historical(labels, SERVICES_BY_ROLE["user"], SERVICES_BY_ROLE["pin"])
    seconds = time.perf_counter() - t0
    df = df.sort_values(["event_timestamp", "user_id", "pin_id"], kind="stable").reset_index(drop=True)
    if len(df) != len(labels):
        raise RuntimeError(f"point-in-time join returned {len(df):,} rows for {len(labels):,} labels")
    df = TRAINING_SET_SCHEMA.validate(df, lazy=True)
    path = training_set_path(cfg)
    atomic_write_parquet(pa.Table.from_pandas(df, preserve_index=False), path)
    interests = pd.read_parquet(snap.path / "staged" / "interests.parquet", columns=["interest_id"])["interest_id"]
    manifest = {
        "snapshot_id": snap.id,
        "as_of": snap.manifest["as_of"],
        "feature_services": dict(SERVICES_BY_ROLE),
        "interest_ids": sorted(int(i) for i in interests),
        "n_interests": int(interests.max()) + 1,
        "rows": len(df),
        "positives": int(df["label"].sum()),
        "seconds": round(seconds, 3),
    }
    atomic_write_text(path.with_suffix(".json"), json.dumps(manifest, indent=2))
    log.info("training set: %s labels (%s positive) with point-in-time features in %.1fs -> %s",
             f"{len(df):,}", f"{manifest['positives']:,}", seconds, path)
    return df, manifest
