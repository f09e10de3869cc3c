{#
    The logical date D of the nightly run as a SQL date literal. Events on or
    after D are not yet known to the run that serves D.
#}
{% macro run_date() -%}
    {%- set today = modules.datetime.date.today().isoformat() -%}
    {%- set value = var('run_date') or today -%}
    {%- set parsed = modules.datetime.date.fromisoformat(value | string) -%}
    date '{{ parsed.isoformat() }}'
{%- endmacro %}
