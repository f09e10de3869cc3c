with

users as (

    select * from {{ ref('stg_app__users') }}

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

interests as (

    select * from {{ ref('user_interest_features') }}

),

users_before_run as (

    select * from users
    where signed_up_at < {{ run_date() }}

),

interactions as (

    select
        user_id,
        event_date,
        'click' as kind
    from clicks
    union all
    select
        user_id,
        event_date,
        'like' as kind
    from likes
    union all
    select
        user_id,
        event_date,
        'booking' as kind
    from bookings
    union all
    select
        user_id,
        event_date,
        'review' as kind
    from reviews

),

interaction_counts as (

    select
        user_id,
        count(*) filter (where kind = 'click') as n_clicks,
        count(*) filter (where kind = 'like') as n_likes,
        count(*) filter (where kind = 'booking') as n_bookings,
        count(*) filter (where kind = 'review') as n_reviews,
        max(event_date) as last_active_date

    from interactions
    group by user_id

),

interest_totals as (

    select
        user_id,
        sum(decayed_weight) as total_decayed_weight

    from interests
    group by user_id

),

final as (

    select
        users_before_run.user_id,
        users_before_run.signed_up_at,
        users_before_run.signup_topics,

        ---------- interactions before the run date
        interaction_counts.last_active_date,
        coalesce(interaction_counts.n_clicks, 0) as n_clicks,
        coalesce(interaction_counts.n_likes, 0) as n_likes,
        coalesce(interaction_counts.n_bookings, 0) as n_bookings,
        coalesce(interaction_counts.n_reviews, 0) as n_reviews,
        coalesce(
            interest_totals.total_decayed_weight, 0
        )::double precision as total_decayed_weight,
        interaction_counts.user_id is null as is_cold_start

    from users_before_run
    left join interaction_counts
        on users_before_run.user_id = interaction_counts.user_id
    left join interest_totals
        on users_before_run.user_id = interest_totals.user_id

)

select * from final
