with

source as (

    select * from {{ source('app', 'users') }}

),

renamed as (

    select
        user_id,
        signed_up_at,
        signup_topics

    from source

)

select * from renamed
