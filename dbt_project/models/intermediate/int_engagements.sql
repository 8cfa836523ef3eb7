-- Engagement events (everything but impressions) of every surface, with the pin remapped to its canonical pin.
-- Models that build labels or features keep only the label surface (macros/surfaces.sql).
select
    e.user_id,
    c.canonical_pin_id as pin_id,
    e.pin_id as source_pin_id,
    e.event_type,
    e.event_timestamp,
    e.surface,
    {{ engagement_weight('e.event_type') }} as weight,
    date_trunc('day', e.event_timestamp) + interval 1 day as day_end
from {{ ref('stg_events') }} as e
join {{ ref('int_pin_canonical') }} as c on c.pin_id = e.pin_id
where e.event_type <> 'impression'
