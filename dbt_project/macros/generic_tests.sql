{#- Generic data tests used by the models' .yml files (kept local: no package downloads at build time). -#}

{% test unique_combination(model, columns) %}
select {{ columns | join(', ') }}, count(*) as n
from {{ model }}
group by {{ columns | join(', ') }}
having count(*) > 1
{% endtest %}

{% test finite_non_negative(model, column_name) %}
select {{ column_name }}
from {{ model }}
where not isfinite({{ column_name }}) or {{ column_name }} < 0
{% endtest %}

{% test single_row(model) %}
select n from (select count(*) as n from {{ model }}) where n <> 1
{% endtest %}
