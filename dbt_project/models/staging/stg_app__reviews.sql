with

source as (

    select * from {{ source('app', 'reviews') }}

),

known_before_run as (

    select * from source
    where event_date < {{ run_date() }}

),

renamed as (

    select
        review_id,
        booking_id,
        user_id,
        service_id,
        rating,
        body,
        created_at,
        event_date

    from known_before_run

)

select * from renamed
