with

impressions as (

    select * from {{ ref('stg_app__impressions') }}

),

services as (

    select * from {{ ref('stg_app__services') }}

),

clicks as (

    select * from {{ ref('stg_app__clicks') }}

),

bookings as (

    select * from {{ ref('stg_app__bookings') }}

),

impressions_in_history as (

    select * from impressions
    where
        event_date >= {{ run_date() }} - {{ var('history_days') }}
        and event_date < {{ run_date() }}

),

clicked_slots as (

    select distinct
        slate_id,
        user_id,
        service_id
    from clicks
    where slate_id is not null

),

booked_slots as (

    select distinct
        slate_id,
        user_id,
        service_id
    from bookings
    where slate_id is not null

),

final as (

    select
        impressions_in_history.slate_id,
        impressions_in_history.user_id,
        impressions_in_history.event_date,
        impressions_in_history.position,
        impressions_in_history.service_id,
        services.topic_id,
        impressions_in_history.propensity,
        clicked_slots.slate_id is not null as clicked,
        booked_slots.slate_id is not null as booked

    from impressions_in_history
    inner join services
        on impressions_in_history.service_id = services.service_id
    left join clicked_slots
        on
            impressions_in_history.slate_id = clicked_slots.slate_id
            and impressions_in_history.user_id = clicked_slots.user_id
            and impressions_in_history.service_id = clicked_slots.service_id
    left join booked_slots
        on
            impressions_in_history.slate_id = booked_slots.slate_id
            and impressions_in_history.user_id = booked_slots.user_id
            and impressions_in_history.service_id = booked_slots.service_id

)

select * from final
