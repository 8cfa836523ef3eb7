-- Positive engagements (closeup, click, save) of every surface, for pre-training ID embeddings on more of each
-- user's tastes than Homefeed alone shows. One row per user per canonical pin per event instant: several events
-- at that instant collapse into the strongest, whose surface the row keeps (ties: the alphabetically first
-- surface, so reruns agree). Hides are left out: the table holds positive engagement only.
select
    user_id,
    pin_id,
    event_timestamp,
    first(surface order by weight desc, surface) as surface,
    max(weight) as weight
from {{ ref('int_engagements') }}
where event_type in ('closeup', 'click', 'save')
group by user_id, pin_id, event_timestamp
