with

slates as (

    select * from {{ ref('choice_training_slates') }}

),

daily_weights as (

    select * from {{ ref('int_user_topic_daily_weights') }}

),

user_days as (

    select distinct
        user_id,
        event_date as state_date

    from slates

),

weights_before_each_day as (

    select
        user_days.user_id,
        user_days.state_date,
        daily_weights.topic_id,
        daily_weights.event_date,
        daily_weights.weight

    from user_days
    inner join daily_weights
        on
            user_days.user_id = daily_weights.user_id
            and user_days.state_date > daily_weights.event_date

),

interests_at_day_start as (

    {{ decayed_interest(
        'weights_before_each_day', 'state_date', ['user_id', 'state_date']
    ) }}

),

final as (

    select
        user_id::bigint as user_id,
        state_date as event_date,
        topic_id::smallint as topic_id,
        decayed_weight,
        interest

    from interests_at_day_start

)

select * from final
