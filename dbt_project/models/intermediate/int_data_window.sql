-- The data's own clock: `as_of` is the midnight after the last event, so every run on the same input
-- computes the same windows regardless of the wall clock. Events of every surface count: the clock says where
-- the input ends, not where the labels do.
select
    date_trunc('day', max(event_timestamp)) + interval 1 day as as_of,
    date_trunc('day', max(event_timestamp)) + interval 1 day
        - to_days({{ var('corpus_window_days') }}) as corpus_window_start,
    min(event_timestamp) as first_event_at,
    max(event_timestamp) as last_event_at
from {{ ref('stg_events') }}
