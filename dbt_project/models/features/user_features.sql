-- Daily user aggregates (and the interests followed so far) as of the midnight after each day the user engaged (the recent-pins sequence,
-- which must be fresher, is user_sequence). A row stamped D only uses events
-- strictly before D, so a label at time t >= D never sees itself (the point-in-time join takes the latest
-- row with event_timestamp <= t).
with days as (
    select
        user_id,
        day_end as event_timestamp,
        cast(sum(engagements) over w7 as bigint) as engagements_7d,
        cast(sum(engagements) over w30 as bigint) as engagements_30d,
        cast(sum(saves) over w30 as bigint) as saves_30d,
        cast(sum(hides) over w30 as bigint) as hides_30d
    from {{ ref('int_user_daily') }}
    window
        w7 as (partition by user_id order by day_end range between interval 6 days preceding and current row),
        w30 as (partition by user_id order by day_end range between interval 29 days preceding and current row)
),

interest_weights as (
    select d.user_id, d.event_timestamp, i.interest_id, sum(i.weight) as weight
    from days as d
    join {{ ref('int_user_interest_daily') }} as i
        on i.user_id = d.user_id
        and i.day_end > d.event_timestamp - interval 30 days
        and i.day_end <= d.event_timestamp
    group by all
),

top_interests as (
    select
        user_id,
        event_timestamp,
        list(interest_id order by weight desc, interest_id)[1:{{ var('top_interests') }}] as top_interest_ids
    from interest_weights
    group by all
),

follows as (
    select d.user_id, d.event_timestamp, list_sort(list_distinct(list(f.interest_id))) as followed_interest_ids
    from days as d
    join {{ ref('stg_user_follows') }} as f
        on f.user_id = d.user_id and f.followed_at < d.event_timestamp
    group by all
)

select
    d.user_id,
    d.event_timestamp,
    d.engagements_7d,
    d.engagements_30d,
    d.saves_30d,
    d.hides_30d,
    coalesce(t.top_interest_ids, []::bigint[]) as top_interest_ids,
    coalesce(f.followed_interest_ids, []::bigint[]) as followed_interest_ids,
    date_trunc('second', d.event_timestamp) as user_features_at  -- whole seconds, like Feast online
from days as d
left join top_interests as t
    on t.user_id = d.user_id and t.event_timestamp = d.event_timestamp
left join follows as f
    on f.user_id = d.user_id and f.event_timestamp = d.event_timestamp
