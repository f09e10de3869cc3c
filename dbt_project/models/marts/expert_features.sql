with

services as (

    select * from {{ ref('stg_app__services') }}

),

impressions as (

    select * from {{ ref('stg_app__impressions') }}

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

service_events as (

    select
        service_id,
        'impression' as kind,
        null::int as rating
    from impressions
    union all
    select
        service_id,
        'click' as kind,
        null::int as rating
    from clicks
    union all
    select
        service_id,
        'like' as kind,
        null::int as rating
    from likes
    union all
    select
        service_id,
        'booking' as kind,
        null::int as rating
    from bookings
    union all
    select
        service_id,
        'review' as kind,
        rating::int as rating
    from reviews

),

service_counts as (

    select
        service_id,
        count(*) filter (where kind = 'impression') as impressions,
        count(*) filter (where kind = 'click') as clicks,
        count(*) filter (where kind = 'booking') as bookings,
        count(*) filter (where kind = 'like') as likes,
        count(*) filter (where kind = 'review') as n_reviews,
        coalesce(sum(rating), 0) as rating_sum

    from service_events
    group by service_id

),

counts_per_service as (

    select
        services.service_id,
        services.expert_id,
        services.topic_id,
        services.price,
        services.duration_minutes,
        services.is_active,
        coalesce(service_counts.impressions, 0) as impressions,
        coalesce(service_counts.clicks, 0) as clicks,
        coalesce(service_counts.bookings, 0) as bookings,
        coalesce(service_counts.likes, 0) as likes,
        coalesce(service_counts.n_reviews, 0) as n_reviews,
        coalesce(service_counts.rating_sum, 0) as rating_sum

    from services
    left join service_counts
        on services.service_id = service_counts.service_id

),

final as (

    select
        service_id,
        expert_id,
        topic_id,
        price,
        duration_minutes,
        is_active,

        ---------- counts before the run date
        impressions,
        clicks,
        bookings,
        likes,
        n_reviews,
        rating_sum,

        ---------- rates shrunk towards a prior
        (clicks + 1.0)::double precision
        / (impressions + 20) as ctr_smoothed,
        (bookings + 0.5)::double precision
        / (clicks + 2) as booking_rate_smoothed,
        (rating_sum + 3.5 * 5)::double precision
        / (n_reviews + 5) as avg_rating_smoothed

    from counts_per_service

)

select * from final
