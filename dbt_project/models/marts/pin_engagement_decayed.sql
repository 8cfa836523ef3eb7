-- Time-decayed engagement of each canonical pin at the end of every day it had activity:
--   decayed(D) = sum over events e <= D of weight(e) * 0.5 ^ ((D - t_e) / half_life)
-- computed as a running sum rescaled to a per-pin reference day r:
--   decayed(D) = 0.5^((D - r)/h) * sum_{d <= D} decayed_weight(d) * 2^((d - r)/h)
-- which is exact and O(n); it stays finite while a pin's history spans < ~1000 half-lives.
with daily as (
    select
        pin_id,
        day_end,
        engagements,
        decayed_weight,
        min(day_end) over (partition by pin_id) as ref_day
    from {{ ref('int_pin_daily') }}
)
select
    pin_id,
    day_end as event_timestamp,
    engagements,
    {{ decay(days_between('ref_day', 'day_end')) }}
        * sum(decayed_weight / {{ decay(days_between('ref_day', 'day_end')) }})
            over (partition by pin_id order by day_end rows between unbounded preceding and current row)
        as decayed_engagement
from daily
