select interest_id, name
from {{ source('raw', 'interests') }}
