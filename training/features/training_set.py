"""Stage: the point-in-time training set.

Engagement labels (dbt mart ``fct_engagements``) joined with Feast ``get_historical_features`` through
the user and pin feature services (``user_tower_v2``, ``pin_tower_v1``): each label gets the newest feature row at
or before its own timestamp, and since feature rows only summarize events strictly before their
timestamp, no label sees itself or the future. The result passes ``TRAINING_SET_SCHEMA`` before it is
written, with a manifest that ties it to the data snapshot and the feature services (by role), and records
the snapshot's interest ids.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from feature_repo.feature_services import SERVICES_BY_ROLE
from training.config import Config
from training.data.contracts import TRAINING_SET_SCHEMA
from training.data.snapshot import load_live
from training.features.store import feature_store
from training.io import ParquetAppender, atomic_path, atomic_write_text

log = logging.getLogger(__name__)

LABEL_COLUMNS = ["user_id", "pin_id", "event_timestamp", "event_type", "weight", "label"]


def training_set_path(cfg: Config) -> Path:
    return cfg.data_path / "training" / "training_set.parquet"


ORDER = ["event_timestamp", "user_id", "pin_id"]
"""The training set's row order (ties keep the labels' order)."""


def row_hashes(labels: pd.DataFrame) -> np.ndarray:
    """One 64-bit hash per label row (``LABEL_COLUMNS``)."""
    return pd.util.hash_pandas_object(labels[LABEL_COLUMNS], index=False).to_numpy()


def labels_digest(hashes: np.ndarray) -> str:
    """A digest of label rows in their order (their ``row_hashes``): the same labels in the same order give the same
    digest."""
    return hashlib.sha256(hashes.tobytes()).hexdigest()[:32]


def _continuation(cfg: Config, snap, labels: pd.DataFrame, hashes: np.ndarray) -> tuple[int, str]:
    """(how many of ``labels``, in ``ORDER``, the previous training set already holds, why); 0 = rebuild whole.

    The previous rows stay valid when its snapshot is of the same lineage (the same source, contract and transform
    config and dbt code: feature values at a past instant summarize only data before it, so newer data cannot change
    them), it used the same feature services, the labels up to its last label's instant are the same rows in the same
    order, and the staged data up to that instant is the same (``Snapshot.history_digest``): late events, edited
    rows, a changed pin remap or a shorter history fail the check."""
    path = training_set_path(cfg)
    meta = path.with_suffix(".json")
    if not cfg.features.incremental_training_set:
        return 0, "features.incremental_training_set is off"
    if not path.exists() or not meta.exists():
        return 0, "no previous training set"
    prev = json.loads(meta.read_text())
    if "labels_end" not in prev or prev.get("lineage") != snap.lineage:
        return 0, "the previous training set is of another lineage (source, contract or transform config, dbt code)"
    if prev.get("feature_services") != dict(SERVICES_BY_ROLE):
        return 0, "the feature services changed"
    if pq.ParquetFile(path).metadata.num_rows != prev["rows"]:
        return 0, "the previous file does not hold the rows its manifest records"
    end = pd.Timestamp(prev["labels_end"])
    n_old = int(labels["event_timestamp"].searchsorted(end, side="right"))
    if n_old != prev["rows"] or labels_digest(hashes[:n_old]) != prev["labels_digest"]:
        return 0, f"the labels up to {prev['labels_end']} changed (late events or a changed remap)"
    if snap.history_digest(end.to_pydatetime()) != prev.get("history_digest"):
        return 0, f"the staged data up to {prev['labels_end']} changed (late or edited rows)"
    return n_old, f"{n_old:,} rows kept from snapshot {prev['snapshot_id']}"


def build_training_set(cfg: Config) -> dict[str, Any]:
    """Join the live snapshot's labels with point-in-time features; validate; write; return the manifest.

    The labels are joined in parts of ``features.historical_chunk_rows`` rows in ``ORDER``, and each part is
    validated and appended to the parquet file as its own row group before the next is joined, so the stage holds
    the labels and one part at a time, never the whole training set. When the previous training set is a valid
    prefix (``_continuation``), its row groups are copied as they are and only the labels after its end are joined
    (``features.incremental_training_set``). The file appears whole or not at all."""
    snap = load_live(cfg)
    labels = pd.read_parquet(snap.table("fct_engagements"), columns=LABEL_COLUMNS)
    labels = labels.sort_values(ORDER, kind="stable").reset_index(drop=True)
    hashes = row_hashes(labels)
    n_old, why = _continuation(cfg, snap, labels, hashes)
    path = training_set_path(cfg)
    t0 = time.perf_counter()
    rows = positives = 0
    with atomic_path(path) as tmp:
        out = ParquetAppender(tmp)
        try:
            if n_old:
                previous = pq.ParquetFile(path)
                for i in range(previous.num_row_groups):
                    group = previous.read_row_group(i)
                    out.write(group)
                    rows += group.num_rows
                    positives += int(pc.sum(group["label"]).as_py() or 0)
            new = labels.iloc[n_old:]
            parts = (feature_store(cfg).historical_parts(new, SERVICES_BY_ROLE["user"], SERVICES_BY_ROLE["pin"],
                                                         chunk=cfg.features.historical_chunk_rows) if len(new) else ())
            for part in parts:
                part = TRAINING_SET_SCHEMA.validate(part.sort_values(ORDER, kind="stable").reset_index(drop=True),
                                                    lazy=True)
                table = pa.Table.from_pandas(part, preserve_index=False)
                if out.writer is not None and table.schema.names != out.writer.schema.names:   # the file is not written
                    raise RuntimeError(f"the new rows' columns {table.schema.names} are not the training set's "
                                       f"{out.writer.schema.names}: rebuild it whole "
                                       "(--features.incremental_training_set false)")
                out.write(table)
                rows, positives = rows + len(part), positives + int(part["label"].sum())
        finally:
            out.close()
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
        "mode": "incremental" if n_old else "full",
        "joined_rows": rows - n_old,
        "why": why,
        "lineage": snap.lineage,
        "labels_end": labels["event_timestamp"].iloc[-1].isoformat(),
        "labels_digest": labels_digest(hashes),
        "history_digest": snap.history_digest(labels["event_timestamp"].iloc[-1].to_pydatetime()),
        "seconds": round(seconds, 3),
    }
    atomic_write_text(path.with_suffix(".json"), json.dumps(manifest, indent=2))
    log.info("training set (%s: %s): %s labels (%s positive, %s joined) with point-in-time features in %.1fs -> %s",
             manifest["mode"], why, f"{rows:,}", f"{positives:,}", f"{rows - n_old:,}", seconds, path)
    return manifest
