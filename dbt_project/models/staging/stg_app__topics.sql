with

source as (

    select * from {{ source('app', 'topics') }}

),

renamed as (

    select
        topic_id,
        name as topic_name

    from source

)

select * from renamed
