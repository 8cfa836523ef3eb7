-- Interests users follow explicitly (empty for sources without follows); one row per user and interest, the
-- earliest follow kept.
select user_id, interest_id, min(followed_at) as followed_at
from {{ source('raw', 'user_follows') }}
where {{ before_until('followed_at') }}
group by all
