{#
    Models land in the target schema (analytics) or in their custom schema
    as named, never in dbt's default "<target>_<custom>" concatenation.
#}
{% macro generate_schema_name(custom_schema_name, node) -%}
    {{ (custom_schema_name or target.schema) | trim }}
{%- endmacro %}
