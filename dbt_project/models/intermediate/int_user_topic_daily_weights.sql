with

users as (

    -- The source rather than stg_app__users (a plain rename of it): a ref would
    -- make this model a descendant of stg_app__users, and the relationships
    -- tests that point from the interest models to the users and topics
    -- staging models, which `dbt test --select stg_app__users` also runs, would
    -- then wait for a model that waits for them in the per-model Airflow tasks
    -- (rec/dbt_tasks.py).
    select
        user_id,
        signed_up_at,
        signup_topics

    from {{ source('app', 'users') }}

),

services as (

    select * from {{ ref('stg_app__services') }}

),

topics as (

    -- The source, for the reason given for users above.
    select topic_id from {{ source('app', 'topics') }}

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

signup_prior as (

    -- What a user picked at sign-up counts as signup_prior_weight clicks on
    -- the sign-up day, shared among the picked topics (unknown ids are left
    -- out of the weight but not of the share).
    select
        users.user_id,
        picked.topic_id,
        users.signed_up_at::date as event_date,
        {{ var('signup_prior_weight') }}::double precision
        / cardinality(users.signup_topics) as weight

    from users
    cross join lateral unnest(users.signup_topics) as picked (topic_id)
    inner join topics
        on picked.topic_id = topics.topic_id

),

all_weights as (

    select * from with_topic
    union all
    select * from signup_prior

),

daily_weights as (

    select
        user_id,
        topic_id,
        event_date,
        sum(weight)::double precision as weight

    from all_weights
    group by user_id, topic_id, event_date

)

select * from daily_weights
