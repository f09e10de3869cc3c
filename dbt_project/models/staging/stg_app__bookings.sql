with

source as (

    select * from {{ source('app', 'bookings') }}

),

known_before_run as (

    select * from source
    where event_date < {{ run_date() }}

),

renamed as (

    select
        booking_id,
        user_id,
        service_id,
        slate_id,
        price::double precision as price,
        booked_at,
        event_date

    from known_before_run

)

select * from renamed
