"""Feature services, named like model versions: training and serving both read features only through these."""

from feast import FeatureService

from feature_repo.feature_views import (
    pin_features,
    pin_profile,
    user_features,
    user_impressions,
    user_profile,
    user_sequence,
)

USER_TOWER_SERVICE = "user_tower_v2"
PIN_TOWER_SERVICE = "pin_tower_v1"

# Why: the user tower's inputs, fetched online per request and offline for the point-in-time training set.
user_tower_v2 = FeatureService(
    name=USER_TOWER_SERVICE, features=[user_profile, user_sequence, user_features, user_impressions],
    tags={"tower": "user"},
)

# Why: what models released before user_impressions existed read; kept so a rollback to one still serves.
user_tower_v1 = FeatureService(
    name="user_tower_v1", features=[user_profile, user_sequence, user_features], tags={"tower": "user"}
)

# Why: the pin tower's inputs, used to embed the serving corpus and in the training set.
pin_tower_v1 = FeatureService(name=PIN_TOWER_SERVICE, features=[pin_profile, pin_features], tags={"tower": "pin"})

FEATURE_SERVICES = [user_tower_v2, user_tower_v1, pin_tower_v1]

SERVICES_BY_ROLE = {"user": USER_TOWER_SERVICE, "pin": PIN_TOWER_SERVICE}
"""The feature service of each tower: training sets, checkpoints and releases record it by role."""
