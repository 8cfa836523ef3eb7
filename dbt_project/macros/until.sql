{#- The data stage's end (`data.until`, passed by `retrieval build` as the `until` var; empty = no cut): staging
    keeps only rows strictly before it, so no model sees an event, pin, user or follow at or after it and the
    snapshot's as_of (midnight after the last event) is at most `until`. A MovieLens replay moves it forward. -#}
{% macro before_until(column) -%}
    {%- if var('until', '') -%}
    {{ column }} < cast('{{ var("until") }}' as timestamptz)
    {%- else -%}
    true
    {%- endif -%}
{%- endmacro %}
