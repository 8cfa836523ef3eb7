-- Daily weighted Homefeed engagement per user and interest (positive engagement on the label surface only).
select
    e.user_id,
    e.day_end,
    p.interest_id,
    sum(e.weight) as weight
from {{ ref('int_engagements') }} as e
join {{ ref('stg_pins') }} as p on p.pin_id = e.pin_id
where e.weight > 0 and e.surface = {{ label_surface() }}
group by all
