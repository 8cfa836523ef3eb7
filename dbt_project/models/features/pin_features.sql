-- Dynamic pin features for canonical pins: one row when the pin is created and one at the midnight after every
-- day it had activity. Counts cover the 30 days up to the row; decayed engagement is carried forward
-- from the latest pin_engagement_decayed row and decayed to the row's time.
with keys as (
    select pin_id, day_end as event_timestamp from {{ ref('int_pin_daily') }}
    union
    select c.pin_id, p.created_at
    from {{ ref('int_pin_canonical') }} as c
    join {{ ref('stg_pins') }} as p on p.pin_id = c.pin_id
    where c.pin_id = c.canonical_pin_id
),

counted as (
    select
        k.pin_id,
        k.event_timestamp,
        cast(sum(coalesce(d.impressions, 0)) over w30 as bigint) as pin_impressions_30d,
        cast(sum(coalesce(d.engagements, 0)) over w30 as bigint) as pin_engagements_30d,
        cast(sum(coalesce(d.saves, 0)) over w30 as bigint) as pin_saves_30d
    from keys as k
    left join {{ ref('int_pin_daily') }} as d
        on d.pin_id = k.pin_id and d.day_end = k.event_timestamp
    window w30 as (
        partition by k.pin_id order by k.event_timestamp range between interval 29 days preceding and current row
    )
)

select
    c.pin_id,
    c.event_timestamp,
    coalesce(
        e.decayed_engagement * {{ decay(days_between('e.event_timestamp', 'c.event_timestamp')) }}, 0.0
    ) as decayed_engagement,
    c.pin_impressions_30d,
    c.pin_engagements_30d,
    c.pin_saves_30d,
    greatest({{ days_between('p.created_at', 'c.event_timestamp') }}, 0.0) as age_days,
    -- Feast's UnixTimestamp is whole seconds online: truncate here so offline and online agree
    date_trunc('second', c.event_timestamp) as pin_features_at
from counted as c
join {{ ref('stg_pins') }} as p on p.pin_id = c.pin_id
asof left join {{ ref('pin_engagement_decayed') }} as e
    on e.pin_id = c.pin_id and c.event_timestamp >= e.event_timestamp
