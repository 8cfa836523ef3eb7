-- Engagement labels, Homefeed only (the surface retrieval serves; other surfaces' engagements are in
-- fct_pretrain_engagements). Several events of one user on one canonical pin at the same instant collapse into
-- the strongest one (save > click > closeup > hide). label = 1 for positive engagement, 0 for a hide.
select
    user_id,
    pin_id,
    event_timestamp,
    arg_max(event_type, weight) as event_type,
    max(weight) as weight,
    cast(case when max(weight) > 0 then 1 else 0 end as bigint) as label
from {{ ref('int_engagements') }}
where surface = {{ label_surface() }}
group by user_id, pin_id, event_timestamp
