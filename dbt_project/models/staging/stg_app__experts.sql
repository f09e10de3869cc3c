with

source as (

    select * from {{ source('app', 'experts') }}

),

renamed as (

    select
        expert_id,
        topic_id,
        name as expert_name,
        joined_at

    from source

)

select * from renamed
