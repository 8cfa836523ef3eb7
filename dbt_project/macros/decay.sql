{#- Weight of an engagement that is `age_days` old: halves every `half_life_days`. The one place the decay
    law lives: the corpus ranking and the pin features both call it. -#}
{% macro decay(age_days) -%}
    pow(0.5, ({{ age_days }}) / {{ var('half_life_days') }})
{%- endmacro %}

{#- Fractional days between two timestamps (b - a). -#}
{% macro days_between(a, b) -%}
    (epoch({{ b }}) - epoch({{ a }})) / 86400.0
{%- endmacro %}

{#- Weight of an event type from the `engagement_weights` var (0 for anything not listed). -#}
{% macro engagement_weight(event_type) -%}
    case {{ event_type }}
    {%- for name, w in var('engagement_weights').items() %}
        when '{{ name }}' then cast({{ w }} as double)
    {%- endfor %}
        else 0.0
    end
{%- endmacro %}
