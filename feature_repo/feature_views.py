"""Feature views over the dbt feature tables. TTL bounds how stale a value may be in a point-in-time join."""

from datetime import timedelta

from feast import FeatureView, Field
from feast.types import Array, Float64, Int64, String, UnixTimestamp

from feature_repo.data_sources import (
    pin_features_source,
    pin_profile_source,
    user_features_source,
    user_impressions_source,
    user_profile_source,
    user_sequence_push,
)
from feature_repo.entities import pin, user

FEATURE_TTL = timedelta(days=120)

# Why: profile attributes the user tower reads even for users with no engagement yet. Profiles don't expire.
user_profile = FeatureView(
    name="user_profile",
    entities=[user],
    ttl=timedelta(0),
    schema=[
        Field(name="age", dtype=Int64),
        Field(name="gender", dtype=String),
        Field(name="segment", dtype=String),
    ],
    source=user_profile_source,
    online=True,
    tags={"dbt_model": "user_profile"},
)

# Why: the user's engagement sequence, the user tower's strongest signal; fresh at every engagement, pushed online in
# real time by the event ingestion and recomputed by dbt from the same events.
user_sequence = FeatureView(
    name="user_sequence",
    entities=[user],
    ttl=FEATURE_TTL,
    schema=[
        Field(name="recent_pin_ids", dtype=Array(Int64)),
        Field(name="recent_pin_ages_days", dtype=Array(Float64)),
        Field(name="history_length", dtype=Int64),
        Field(name="user_sequence_at", dtype=UnixTimestamp),
    ],
    source=user_sequence_push,
    online=True,
    tags={"dbt_model": "user_sequence"},
)

# Why: slower-moving daily aggregates for the user tower: engagement counts, top interests; and the interests
# the user follows (the conditions of conditional retrieval).
user_features = FeatureView(
    name="user_features",
    entities=[user],
    ttl=FEATURE_TTL,
    schema=[
        Field(name="engagements_7d", dtype=Int64),
        Field(name="engagements_30d", dtype=Int64),
        Field(name="saves_30d", dtype=Int64),
        Field(name="hides_30d", dtype=Int64),
        Field(name="top_interest_ids", dtype=Array(Int64)),
        Field(name="followed_interest_ids", dtype=Array(Int64)),
        Field(name="user_features_at", dtype=UnixTimestamp),
    ],
    source=user_features_source,
    online=True,
    tags={"dbt_model": "user_features"},
)

# Why: a ranking system shows users what it believes they like, so what they were shown (every surface) samples their
# interests several times more densely than their engagements; a daily batch, so a request's own session is not in it.
user_impressions = FeatureView(
    name="user_impressions",
    entities=[user],
    ttl=FEATURE_TTL,
    schema=[
        Field(name="impressed_interest_ids", dtype=Array(Int64)),
        Field(name="impressed_interest_counts", dtype=Array(Int64)),
        Field(name="impressions_window", dtype=Int64),
        Field(name="user_impressions_at", dtype=UnixTimestamp),
    ],
    source=user_impressions_source,
    online=True,
    tags={"dbt_model": "user_impressions"},
)

# Why: the pin's interest, known from creation, so even a pin nobody engaged with has it. No expiry.
pin_profile = FeatureView(
    name="pin_profile",
    entities=[pin],
    ttl=timedelta(0),
    schema=[Field(name="interest_id", dtype=Int64)],
    source=pin_profile_source,
    online=True,
    tags={"dbt_model": "pin_profile"},
)

# Why: the pin's recent reception for the pin tower: decayed engagement, popularity, age.
pin_features = FeatureView(
    name="pin_features",
    entities=[pin],
    ttl=FEATURE_TTL,
    schema=[
        Field(name="decayed_engagement", dtype=Float64),
        Field(name="pin_impressions_30d", dtype=Int64),
        Field(name="pin_engagements_30d", dtype=Int64),
        Field(name="pin_saves_30d", dtype=Int64),
        Field(name="age_days", dtype=Float64),
        Field(name="pin_features_at", dtype=UnixTimestamp),
    ],
    source=pin_features_source,
    online=True,
    tags={"dbt_model": "pin_features"},
)

FEATURE_VIEWS = [user_profile, user_sequence, user_features, user_impressions, pin_profile, pin_features]
