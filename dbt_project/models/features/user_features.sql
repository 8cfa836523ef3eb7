-- User features as of the midnight after each day the user engaged. A row stamped D only uses events
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

-- the last `history_length` positively engaged pins at every positive engagement; ties on the timestamp
-- keep the row whose list includes all tied pins
sequences as (
    select
        user_id,
        event_timestamp,
        list(pin_id) over w as pin_ids,
        list(event_timestamp) over w as pin_times
    from {{ ref('fct_engagements') }}
    where label = 1
    window w as (
        partition by user_id order by event_timestamp, pin_id
        rows between {{ var('history_length') - 1 }} preceding and current row
    )
    qualify row_number() over (partition by user_id, event_timestamp order by pin_id desc) = 1
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
)

select
    d.user_id,
    d.event_timestamp,
    d.engagements_7d,
    d.engagements_30d,
    d.saves_30d,
    d.hides_30d,
    coalesce(list_reverse(s.pin_ids), []::bigint[]) as recent_pin_ids,
    coalesce(
        list_transform(
            list_reverse(s.pin_times),
            lambda t: (epoch(d.event_timestamp) - epoch(t)) / 86400.0
        ),
        []::double[]
    ) as recent_pin_ages_days,
    coalesce(t.top_interest_ids, []::bigint[]) as top_interest_ids,
    date_trunc('second', d.event_timestamp) as user_features_at  -- whole seconds, like Feast online
from days as d
asof left join sequences as s
    on s.user_id = d.user_id and d.event_timestamp > s.event_timestamp
left join top_interests as t
    on t.user_id = d.user_id and t.event_timestamp = d.event_timestamp
