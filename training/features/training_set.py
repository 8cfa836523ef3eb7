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
import pyarrow.parquet as pq

from feature_repo.feature_services import SERVICES_BY_ROLE
from training.config import Config
from training.data.contracts import TRAINING_SET_SCHEMA
from training.data.snapshot import load_live
from training.features.store import feature_store
from training.io import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

LABEL_COLUMNS = ["user_id", "pin_id", "event_timestamp", "event_type", "weight", "label"]


def training_set_path(cfg: Config) -> Path:
    return cfg.data_path / "training" / "training_set.parquet"


ORDER = ["event_timestamp", "user_id", "pin_id"]
"""The training set's row order (ties keep the labels' order)."""


def build_training_set(cfg: Config) -> dict[str, Any]:
    """Join the live snapshot's labels with point-in-time features; validate; write; return the manifest.

    The labels are joined in parts of ``features.historical_chunk_rows`` rows in ``ORDER``, and each part is
    validated and appended to the parquet file as its own row group before the next is joined, so the stage holds
    the labels and one part at a time, never the whole training set. The file appears whole or not at all."""
    snap = load_live(cfg)
    labels = pd.read_parquet(snap.table("fct_engagements"), columns=LABEL_COLUMNS)
    labels = labels.sort_values(ORDER, kind="stable").reset_index(drop=True)
    path = training_set_path(cfg)
    t0 = time.perf_counter()
    rows = positives = 0
    with atomic_path(path) as tmp:
        writer = None
        try:
            for part in feature_store(cfg).historical_parts(labels, SERVICES_BY_ROLE["user"], SERVICES_BY_ROLE["pin"],
                                                            chunk=cfg.features.historical_chunk_rows):
                part = TRAINING_SET_SCHEMA.validate(part.sort_values(ORDER, kind="stable").reset_index(drop=True),
                                                    lazy=True)
                table = pa.Table.from_pandas(part, preserve_index=False)
                if writer is None:
                    writer = pq.ParquetWriter(tmp, table.schema)
                writer.write_table(table.cast(writer.schema))
                rows, positives = rows + len(part), positives + int(part["label"].sum())
        finally:
            if writer is not None:
                writer.close()
        if rows != len(labels) or not rows:   # raised inside: the file is not written
            raise RuntimeError(f"point-in-time join returned {rows:,} rows for {len(labels):,} labels")
    seconds = time.perf_counter() - t0
    interests = pd.read_parquet(snap.path / "staged" / "interests.parquet", columns=["interest_id"])["interest_id"]
    manifest = {
        "snapshot_id": snap.id,
        "as_of": snap.manifest["as_of"],
        "feature_services": dict(SERVICES_BY_ROLE),
        "interest_ids": sorted(int(i) for i in interests),
        "n_interests": int(interests.max()) + 1,
        "rows": rows,
        "positives": positives,
        "seconds": round(seconds, 3),
    }
    atomic_write_text(path.with_suffix(".json"), json.dumps(manifest, indent=2))
    log.info("training set: %s labels (%s positive) with point-in-time features in %.1fs -> %s",
             f"{rows:,}", f"{positives:,}", seconds, path)
    return manifest
