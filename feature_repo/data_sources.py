"""Parquet sources: the feature tables dbt writes under ``<data_dir>/live/tables``.

``live`` is a symlink switched atomically after a data-stage build succeeds, so Feast always reads a
complete snapshot. Paths are absolute (the DuckDB offline store resolves relative paths against the
current directory): ``<data_dir>`` is ``$RETRIEVAL_DATA_DIR``, or ``.data`` in the checkout.
"""

import os
from pathlib import Path

from feast import FileSource

DATA_DIR = Path(os.environ.get("RETRIEVAL_DATA_DIR", Path(__file__).resolve().parent.parent / ".data")).resolve()
TABLES_DIR = DATA_DIR / "live" / "tables"

# Why: the user's static profile, valid from signup; written by dbt model user_profile.
user_profile_source = FileSource(
    name="user_profile_source",
    path=str(TABLES_DIR / "user_profile.parquet"),
    timestamp_field="event_timestamp",
    tags={"dbt_model": "user_profile"},
)

# Why: point-in-time user features; one row per user per active day, written by dbt model user_features.
user_features_source = FileSource(
    name="user_features_source",
    path=str(TABLES_DIR / "user_features.parquet"),
    timestamp_field="event_timestamp",
    tags={"dbt_model": "user_features"},
)

# Why: static attributes of canonical pins, valid from creation; written by dbt model pin_profile.
pin_profile_source = FileSource(
    name="pin_profile_source",
    path=str(TABLES_DIR / "pin_profile.parquet"),
    timestamp_field="event_timestamp",
    tags={"dbt_model": "pin_profile"},
)

# Why: point-in-time pin features of canonical pins, written by dbt model pin_features.
pin_features_source = FileSource(
    name="pin_features_source",
    path=str(TABLES_DIR / "pin_features.parquet"),
    timestamp_field="event_timestamp",
    tags={"dbt_model": "pin_features"},
)
