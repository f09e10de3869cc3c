{#
    Fails for every combination of `columns` held by more than one row of
    the model; dbt's own `unique` checks a single column only.
#}
{% test unique_combination(model, columns) %}

with

combinations as (

    select
        {{ columns | join(', ') }},
        count(*) as n_rows

    from {{ model }}
    group by {{ columns | join(', ') }}

),

duplicated as (

    select * from combinations
    where n_rows > 1

)

select * from duplicated

{% endtest %}
