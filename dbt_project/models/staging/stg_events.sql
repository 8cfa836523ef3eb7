select
    user_id,
    pin_id,
    event_type,
    event_timestamp,
    surface
from {{ source('raw', 'events') }}
where {{ before_until('event_timestamp') }}
