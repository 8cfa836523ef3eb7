-- Near-duplicate pins share an image signature; the earliest-created pin of each signature (ties: lowest
-- pin_id) is the canonical one. Training labels, features and the serving corpus all use canonical ids.
select
    pin_id,
    first(pin_id order by created_at, pin_id) over (partition by image_signature) as canonical_pin_id,
    image_signature
from {{ ref('stg_pins') }}
