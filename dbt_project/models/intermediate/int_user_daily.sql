-- Daily Homefeed engagement per user (days with at least one engagement event, hides included); user features
-- count the label surface only.
select
    user_id,
    day_end,
    count(*) filter (where weight > 0) as engagements,
    count(*) filter (where event_type = 'save') as saves,
    count(*) filter (where event_type = 'hide') as hides
from {{ ref('int_engagements') }}
where surface = {{ label_surface() }}
group by all
