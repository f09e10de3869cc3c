-- Published lists become one partition per run date, so that a night's list is loaded into
-- a table of its own and swapped in with one short transaction (rec/publish.py).
alter table rec.recommendations rename to recommendations_unpartitioned;
alter table rec.recommendations_unpartitioned
    rename constraint recommendations_pkey to recommendations_unpartitioned_pkey;
alter index rec.recommendations_service rename to recommendations_unpartitioned_service;

create table rec.recommendations (
    run_date date not null,
    user_id bigint not null,
    rank smallint not null check (rank >= 1),
    service_id integer not null,
    expert_id integer not null,
    score real not null,
    propensity real not null check (propensity > 0 and propensity <= 1),
    model_version text not null,
    generated_at timestamptz not null,
    primary key (run_date, user_id, rank)
) partition by range (run_date);

-- One expert's reach over a range of dates: partitions pruned by date, then this index.
create index recommendations_expert on rec.recommendations (expert_id, user_id);

comment on table rec.recommendations is
    'Every user''s ranked list per run date; one partition per date, replaced atomically.';

-- Earlier rows move into one partition per date, named as the publisher names them.
do $$
declare
    day date;
begin
    for day in select distinct run_date from rec.recommendations_unpartitioned order by 1 loop
        execute format(
            'create table rec.%I partition of rec.recommendations'
            ' for values from (%L) to (%L)',
            'recommendations_' || to_char(day, 'YYYYMMDD'), day, day + 1);
    end loop;
end
$$;
insert into rec.recommendations select * from rec.recommendations_unpartitioned;
drop table rec.recommendations_unpartitioned;

-- Analysts read the published lists and the marts, nothing else. The role cannot log in;
-- grant it to a login role (`grant rec_analyst to alice`). Roles are cluster-wide, so
-- another database on the same server may have created it already.
do $$
begin
    if not exists (select 1 from pg_roles where rolname = 'rec_analyst') then
        create role rec_analyst nologin;
    end if;
end
$$;
grant usage on schema rec, analytics to rec_analyst;
grant select on rec.recommendations to rec_analyst;
-- The marts are granted by dbt itself on every build (`+grants` in dbt_project.yml), so a
-- rebuilt mart keeps its grant; staging and intermediate views stay private.
