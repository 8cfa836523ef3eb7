-- Static user profile, valid from signup: a label's point-in-time join finds it even before the user's
-- first engagement day.
select
    user_id,
    signup_at as event_timestamp,
    age,
    gender,
    segment
from {{ ref('stg_users') }}
