with

source as (

    select * from {{ source('app', 'impressions') }}

),

known_before_run as (

    select * from source
    where event_date < {{ run_date() }}

),

renamed as (

    select
        impression_id,
        slate_id,
        user_id,
        service_id,
        position,
        propensity::double precision as propensity,
        source as slate_source,
        shown_at,
        event_date

    from known_before_run

)

select * from renamed
