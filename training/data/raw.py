"""The raw-input layout shared by every data source (synthetic generator, MovieLens ingest).

A source produces ``RawTables`` and ``write_raw`` stores them as parquet under ``<dir>/``:

- ``users.parquet``     user_id int64, age int64, gender string, segment string, signup_at timestamp[us, UTC]
- ``interests.parquet`` interest_id int64, name string
- ``pins.parquet``      pin_id int64, interest_id int64 (primary topic), image_signature string,
                        created_at timestamp[us, UTC]
- ``events.parquet``    user_id int64, pin_id int64, event_type string (impression | closeup | click |
                        save | hide), event_timestamp timestamp[us, UTC], surface string (homefeed |
                        search | related: where the impression was shown; an engagement carries the
                        surface of its impression)
- ``user_follows.parquet`` (optional) user_id int64, interest_id int64, followed_at timestamp[us, UTC]: the
                        interests a user explicitly follows (synthetic: correlated with the user's dominant
                        interests; MovieLens has none, so no file: the contract stages an empty table)

Only Homefeed events become training labels and features; the other surfaces' positive engagements feed
the cross-surface pre-training mart (``fct_pretrain_engagements``). An events file written before
``surface`` existed is read by the contract as all Homefeed (``training.data.contracts``).

Timestamps are written as microsecond, UTC-aware: with duckdb 2.0 a nanosecond tz-aware
``event_timestamp`` breaks ``feast materialize``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa

from training.io import atomic_write_parquet

log = logging.getLogger(__name__)

EVENT_TYPES = ("impression", "closeup", "click", "save", "hide")
HOMEFEED = "homefeed"
"""The surface retrieval serves: the only one whose events become training labels and features."""
SURFACES = (HOMEFEED, "search", "related")

TABLES = ("users", "interests", "pins", "events")
OPTIONAL_TABLES = ("user_follows",)
"""Tables a source may leave out (no file = no rows)."""

SCHEMAS: dict[str, pa.Schema] = {
    "users": pa.schema(
        [
            ("user_id", pa.int64()),
            ("age", pa.int64()),
            ("gender", pa.string()),
            ("segment", pa.string()),
            ("signup_at", pa.timestamp("us", tz="UTC")),
        ]
    ),
    "interests": pa.schema([("interest_id", pa.int64()), ("name", pa.string())]),
    "pins": pa.schema(
        [
            ("pin_id", pa.int64()),
            ("interest_id", pa.int64()),
            ("image_signature", pa.string()),
            ("created_at", pa.timestamp("us", tz="UTC")),
        ]
    ),
    "events": pa.schema(
        [
            ("user_id", pa.int64()),
            ("pin_id", pa.int64()),
            ("event_type", pa.string()),
            ("event_timestamp", pa.timestamp("us", tz="UTC")),
            ("surface", pa.string()),
        ]
    ),
    "user_follows": pa.schema(
        [
            ("user_id", pa.int64()),
            ("interest_id", pa.int64()),
            ("followed_at", pa.timestamp("us", tz="UTC")),
        ]
    ),
}


@dataclass
class RawTables:
    """The raw tables of a data source, as pandas frames in the layout above (``user_follows`` None: the source
    has none)."""

    users: pd.DataFrame
    interests: pd.DataFrame
    pins: pd.DataFrame
    events: pd.DataFrame
    user_follows: pd.DataFrame | None = None

    def frames(self) -> dict[str, pd.DataFrame]:
        """Every table the source has (the required ones, then the optional ones it provides)."""
        return {name: getattr(self, name) for name in TABLES + OPTIONAL_TABLES if getattr(self, name) is not None}


def to_arrow(name: str, df: pd.DataFrame) -> pa.Table:
    """Convert a frame to the table's exact arrow schema (microsecond UTC timestamps, columns in layout order).

    A missing column is an error naming it, never a silent default: a source must say which surface its
    events come from (only the contract, reading files, treats a missing ``surface`` as Homefeed).
    """
    schema = SCHEMAS[name]
    missing = [c for c in schema.names if c not in df.columns]
    if missing:
        raise ValueError(f"{name}: missing column(s) {', '.join(missing)} (raw layout: {', '.join(schema.names)})")
    df = df[schema.names].copy()
    for col in schema.names:
        if pa.types.is_timestamp(schema.field(col).type):
            df[col] = pd.to_datetime(df[col], utc=True).dt.floor("us").astype("datetime64[us, UTC]")
    return pa.Table.from_pandas(df, schema=schema, preserve_index=False)


def write_raw(tables: RawTables, out_dir: Path) -> dict[str, int]:
    """Write the raw tables under ``out_dir`` (removing an optional table's file the source does not have);
    returns rows written per table."""
    counts = {}
    for name in OPTIONAL_TABLES:   # a source without the table leaves no stale file from an earlier source
        if getattr(tables, name) is None:
            (out_dir / f"{name}.parquet").unlink(missing_ok=True)
    for name, df in tables.frames().items():
        atomic_write_parquet(to_arrow(name, df), out_dir / f"{name}.parquet")
        counts[name] = len(df)
        log.info("wrote %s rows to %s", f"{len(df):,}", out_dir / f"{name}.parquet")
    return counts
