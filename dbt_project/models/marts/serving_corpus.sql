-- The pins retrieval serves: canonical pins ranked by engagement decayed to `as_of`, counting only the
-- last `corpus_window_days`, top `corpus_size`. Engagement on near-duplicates was already remapped to the
-- canonical pin, so each image signature appears once. Only Homefeed engagement counts: the corpus is what
-- Homefeed retrieval serves, ranked like the pin features the model was trained on.
with windowed as (
    select
        e.pin_id,
        sum(e.weight * {{ decay(days_between('e.event_timestamp', 'w.as_of')) }}) as decayed_engagement,
        count(*) as engagements
    from {{ ref('int_engagements') }} as e
    cross join {{ ref('int_data_window') }} as w
    where e.weight > 0
      and e.surface = {{ label_surface() }}
      and e.event_timestamp >= w.corpus_window_start
      and e.event_timestamp < w.as_of
    group by e.pin_id
)
select
    p.pin_id,
    p.interest_id,
    p.image_signature,
    windowed.decayed_engagement,
    windowed.engagements,
    row_number() over (order by windowed.decayed_engagement desc, p.pin_id) as corpus_rank
from windowed
join {{ ref('stg_pins') }} as p on p.pin_id = windowed.pin_id
qualify corpus_rank <= {{ var('corpus_size') }}
