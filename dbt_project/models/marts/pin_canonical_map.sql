-- The pin -> canonical pin remapping that training and serving both apply.
select pin_id, canonical_pin_id, image_signature
from {{ ref('int_pin_canonical') }}
