{#- The surface whose events are the training labels and every feature: Homefeed, the surface this retrieval
    serves. The other surfaces' positive engagements only reach fct_pretrain_engagements (cross-surface
    pre-training); keeping them out of labels and features keeps those exactly as on Homefeed-only data. -#}
{% macro label_surface() -%}
    'homefeed'
{%- endmacro %}
