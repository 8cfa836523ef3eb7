select user_id, age, gender, segment, signup_at
from {{ source('raw', 'users') }}
where {{ before_until('signup_at') }}
