-- What the user was shown, by interest: impressions of every surface over the last `impression_window_days`,
-- one row per user per day with impressions, stamped at the midnight after that day and computed only from
-- events strictly before it (a daily batch feature: the impressions of the request's own session are not in it).
with days as (
    select distinct user_id, day_end as event_timestamp
    from {{ ref('int_user_impression_interest_daily') }}
),

windowed as (
    select d.user_id, d.event_timestamp, i.interest_id, sum(i.impressions) as impressions
    from days as d
    join {{ ref('int_user_impression_interest_daily') }} as i
        on i.user_id = d.user_id
        and i.day_end > d.event_timestamp - to_days({{ var('impression_window_days') }})
        and i.day_end <= d.event_timestamp
    group by all
)

select
    user_id,
    event_timestamp,
    list(interest_id order by interest_id) as impressed_interest_ids,
    list(cast(impressions as bigint) order by interest_id) as impressed_interest_counts,
    cast(sum(impressions) as bigint) as impressions_window,
    date_trunc('second', event_timestamp) as user_impressions_at  -- whole seconds, like Feast online
from windowed
group by all
