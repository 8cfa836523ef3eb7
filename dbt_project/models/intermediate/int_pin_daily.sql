-- Daily Homefeed activity per canonical pin (the label surface: pin features and the decayed engagement
-- describe the surface the model serves). `decayed_weight` is the day's engagement decayed to the end of that day.
select
    c.canonical_pin_id as pin_id,
    date_trunc('day', e.event_timestamp) + interval 1 day as day_end,
    count(*) filter (where e.event_type = 'impression') as impressions,
    count(*) filter (where e.event_type in ('closeup', 'click', 'save')) as engagements,
    count(*) filter (where e.event_type = 'save') as saves,
    count(*) filter (where e.event_type = 'hide') as hides,
    coalesce(sum(
        {{ engagement_weight('e.event_type') }}
        * {{ decay(days_between('e.event_timestamp', "date_trunc('day', e.event_timestamp) + interval 1 day")) }}
    ), 0.0) as decayed_weight
from {{ ref('stg_events') }} as e
join {{ ref('int_pin_canonical') }} as c on c.pin_id = e.pin_id
where e.surface = {{ label_surface() }}
group by all
