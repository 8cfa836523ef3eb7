select
    user_id,
    pin_id,
    event_type,
    event_timestamp
from {{ source('raw', 'events') }}
