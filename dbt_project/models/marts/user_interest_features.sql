with

daily_weights as (

    select * from {{ ref('int_user_topic_daily_weights') }}

),

interests_as_of_run as (

    {{ decayed_interest('daily_weights', run_date(), ['user_id']) }}

),

final as (

    select
        user_id::bigint as user_id,
        topic_id::smallint as topic_id,
        decayed_weight,
        interest

    from interests_as_of_run

)

select * from final
