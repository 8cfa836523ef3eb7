-- Daily impressions per user and interest, every surface: what the user was shown (the canonical pin's interest).
-- A ranking system shows a user what it believes they like, so these are many more samples of the user's
-- interests than their engagements.
select
    e.user_id,
    date_trunc('day', e.event_timestamp) + interval 1 day as day_end,
    p.interest_id,
    count(*) as impressions
from {{ ref('stg_events') }} as e
join {{ ref('int_pin_canonical') }} as c on c.pin_id = e.pin_id
join {{ ref('stg_pins') }} as p on p.pin_id = c.canonical_pin_id
where e.event_type = 'impression'
group by all
