-- What the Open Bandit ingest owns: how the dataset's keys map onto app ids, each file's
-- accounting (read = accepted + quarantined) and the rows that did not fit.
create schema if not exists ingest;

create table ingest.open_bandit_users (
    user_key text primary key,
    user_id bigint not null unique,
    user_features text[] not null
);

create table ingest.open_bandit_experts (
    expert_key text primary key,
    expert_id integer not null unique
);

create table ingest.open_bandit_items (
    campaign text not null,
    item_id integer not null,
    service_id integer not null unique,
    item_numeric double precision not null,
    item_categorical text[] not null,
    primary key (campaign, item_id)
);

-- The context of each loaded impression that the app schema has no column for.
create table ingest.open_bandit_contexts (
    source text not null,
    row_index bigint not null,
    slate_id uuid not null unique,
    user_item_affinity real[] not null,
    primary key (source, row_index)
);

create table ingest.open_bandit_loads (
    source text not null,
    source_file text not null,
    run_id text not null,
    rows_read integer not null,
    rows_accepted integer not null,
    rows_quarantined integer not null,
    loaded_at timestamptz not null default now(),
    primary key (source, source_file),
    check (rows_read = rows_accepted + rows_quarantined)
);

create table ingest.open_bandit_quarantine (
    source text not null,
    source_file text not null,
    line_number integer not null,
    reason text not null,
    row_data jsonb not null,
    run_id text not null,
    quarantined_at timestamptz not null default now()
);
create index open_bandit_quarantine_source on ingest.open_bandit_quarantine (source);
