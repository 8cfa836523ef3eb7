select pin_id, interest_id, image_signature, created_at
from {{ source('raw', 'pins') }}
where {{ before_until('created_at') }}
