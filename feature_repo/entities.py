"""Entities: the join keys every feature view and the training set are keyed by."""

from feast import Entity, ValueType

# Why: users are who we retrieve for; user features are looked up by user_id online and offline.
user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.INT64, description="A user (pinner).")

# Why: pins are what we retrieve; always the canonical pin id (near-duplicates remapped by dbt).
pin = Entity(name="pin", join_keys=["pin_id"], value_type=ValueType.INT64, description="A canonical pin.")

ENTITIES = [user, pin]
