with

services as (

    select * from {{ ref('stg_app__services') }}

),

clicks as (

    select * from {{ ref('stg_app__clicks') }}

),

likes as (

    select * from {{ ref('stg_app__likes') }}

),

bookings as (

    select * from {{ ref('stg_app__bookings') }}

),

reviews as (

    select * from {{ ref('stg_app__reviews') }}

),

weighted_interactions as (

    select
        user_id,
        service_id,
        event_date,
        1.0 as weight
    from clicks
    union all
    select
        user_id,
        service_id,
        event_date,
        2.0 as weight
    from likes
    union all
    select
        user_id,
        service_id,
        event_date,
        4.0 as weight
    from bookings
    union all
    select
        user_id,
        service_id,
        event_date,
        (rating - 1) / 2.0 as weight
    from reviews

),

with_topic as (

    select
        weighted_interactions.user_id,
        services.topic_id,
        weighted_interactions.event_date,
        weighted_interactions.weight

    from weighted_interactions
    inner join services
        on weighted_interactions.service_id = services.service_id

),

daily_weights as (

    select
        user_id,
        topic_id,
        event_date,
        sum(weight)::double precision as weight

    from with_topic
    group by user_id, topic_id, event_date

)

select * from daily_weights
