with

source as (

    select * from {{ source('app', 'events') }}

),

clicks_known_before_run as (

    select * from source
    where
        event_type = 'click'
        and event_date < {{ run_date() }}

),

renamed as (

    select
        event_id as click_id,
        user_id,
        service_id,
        slate_id,
        occurred_at,
        event_date

    from clicks_known_before_run

)

select * from renamed
