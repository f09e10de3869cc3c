with

source as (

    select * from {{ source('app', 'services') }}

),

renamed as (

    select
        service_id,
        expert_id,
        topic_id,
        title,
        price::double precision as price,
        duration_minutes,
        is_active,
        created_at

    from source

)

select * from renamed
