{#
    Fails for every row whose column lies outside [min_value, max_value];
    either bound may be left out. Nulls are left to `not_null`.
#}
{% test value_between(model, column_name, min_value=none, max_value=none) %}

with

out_of_range as (

    select * from {{ model }}
    where
        {{ column_name }} is not null
        and (
            false
            {%- if min_value is not none %}
            or {{ column_name }} < {{ min_value }}
            {%- endif %}
            {%- if max_value is not none %}
            or {{ column_name }} > {{ max_value }}
            {%- endif %}
        )

)

select * from out_of_range

{% endtest %}
