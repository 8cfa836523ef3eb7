-- The user's recent positive engagements, refreshed at every engagement (not daily): one row per user per
-- engagement instant t, stamped t + 1 microsecond and holding the last `history_length` canonical pins
-- engaged at or before t, newest first. A row stamped T only uses events strictly before T, so a label at
-- time t sees its own history without itself.
with events as (
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
    -- ties on the timestamp: keep the row whose list holds all tied pins
    qualify row_number() over (partition by user_id, event_timestamp order by pin_id desc) = 1
)

select
    user_id,
    event_timestamp + interval 1 microsecond as event_timestamp,
    list_reverse(pin_ids) as recent_pin_ids,
    list_transform(
        list_reverse(pin_times),
        lambda t: (epoch(event_timestamp) - epoch(t)) / 86400.0
    ) as recent_pin_ages_days,
    len(pin_ids) as history_length,
    -- whole seconds, like Feast online
    date_trunc('second', event_timestamp + interval 1 microsecond) as user_sequence_at
from events
