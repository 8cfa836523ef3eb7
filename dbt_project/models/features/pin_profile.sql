-- Static pin attributes of canonical pins, valid from creation (no TTL in Feast).
select
    p.pin_id,
    p.created_at as event_timestamp,
    p.interest_id
from {{ ref('stg_pins') }} as p
join {{ ref('int_pin_canonical') }} as c on c.pin_id = p.pin_id
where c.pin_id = c.canonical_pin_id
