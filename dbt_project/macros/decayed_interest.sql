{#
    Turns daily interaction weights into decayed interests as of a date.

    `weights` is a relation with user_id, topic_id, event_date, weight and
    the as-of column; `keys` are the columns one state is identified by
    (user_id, plus the as-of column when there are several dates). Only
    interactions strictly before the as-of date and within the interest
    window count. Each weight halves every `interest_half_life_days`; a
    topic's interest is its share of the state's total decayed weight.
    Rows whose decayed weight is zero are left out.
#}
{% macro decayed_interest(weights, as_of, keys) -%}
    {%- set half_life = var('interest_half_life_days') -%}
    {%- set window_days = var('interest_window_days') -%}
    with

    decayed as (

        select
            {% for key in keys -%}
            {{ key }},
            {% endfor -%}
            topic_id,
            sum(
                weight * power(
                    0.5,
                    ({{ as_of }} - event_date)::double precision
                    / {{ half_life }}
                )
            )::double precision as decayed_weight

        from {{ weights }}
        where
            event_date < {{ as_of }}
            and event_date >= {{ as_of }} - {{ window_days }}
        group by {% for key in keys %}{{ key }}, {% endfor %}topic_id

    ),

    nonzero as (

        select * from decayed
        where decayed_weight > 0

    ),

    normalised as (

        select
            *,
            decayed_weight / sum(decayed_weight) over (
                partition by {{ keys | join(', ') }}
            ) as interest

        from nonzero

    )

    select * from normalised
{%- endmacro %}
