"""Parquet sources: the feature tables dbt writes under ``<data_dir>/live/tables``.

``live`` is a symlink switched atomically after a data-stage build succeeds, so Feast always reads a
complete snapshot. Paths are absolute (the DuckDB offline store resolves relative paths against the
current directory). The objects below point at the checkout's ``.data`` (what a plain ``feast apply`` from
the repo root registers, next to feature_store.yaml's ``.data/feast``); ``retrieval`` re-roots them at its
configured data dir (``training.features.store.definitions``).
"""

from pathlib import Path

from feast import FileSource, PushSource

CHECKOUT_DATA_DIR = Path(__file__).resolve().parent.parent / ".data"


def dbt_table(model: str, data_dir: Path = CHECKOUT_DATA_DIR) -> FileSource:
    """The parquet file dbt model ``model`` writes; tagged with the model so lineage is one lookup."""
    return FileSource(
        name=f"{model}_source",
        path=str(Path(data_dir) / "live" / "tables" / f"{model}.parquet"),
        timestamp_field="event_timestamp",
        tags={"dbt_model": model},
    )


# Why: the user's static profile, valid from signup.
user_profile_source = dbt_table("user_profile")

# Why: point-in-time user features, one row per user per active day.
user_features_source = dbt_table("user_features")

# Why: what the user was shown, by interest, one row per user per day with impressions.
user_impressions_source = dbt_table("user_impressions")

# Why: the user's recent engaged pins, refreshed at every engagement.
user_sequence_source = dbt_table("user_sequence")


def sequence_push(batch_source: FileSource) -> PushSource:
    """The push source of the recent-engagement sequence over ``batch_source``."""
    return PushSource(name="user_sequence_push", batch_source=batch_source, tags={"dbt_model": "user_sequence"})


# Why: real-time engagements (POST /events) update the sequence online between builds; the batch path recomputes
# the same rows from the event log (training/features/realtime.py).
user_sequence_push = sequence_push(user_sequence_source)

# Why: static attributes of canonical pins, valid from creation.
pin_profile_source = dbt_table("pin_profile")

# Why: point-in-time features of canonical pins, one row at creation and per active day.
pin_features_source = dbt_table("pin_features")
