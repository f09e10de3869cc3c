-- Extracted copies of the app's tables. Event tables are keyed by their source
-- id and carry the day they belong to, so that re-extracting a day replaces
-- exactly that day. Dimension tables are full snapshots.
create table raw.topics (like app.topics including all);
create table raw.experts (like app.experts);
alter table raw.experts add primary key (expert_id);
create table raw.services (like app.services);
alter table raw.services add primary key (service_id);
create table raw.users (like app.users);
alter table raw.users add primary key (user_id);

create table raw.impressions (
    impression_id bigint primary key,
    slate_id uuid not null,
    user_id bigint not null,
    service_id integer not null,
    position smallint not null,
    propensity real,
    source text not null,
    shown_at timestamptz not null,
    event_date date not null,
    extracted_at timestamptz not null default now()
);
create index raw_impressions_event_date on raw.impressions (event_date);

create table raw.events (
    event_id bigint primary key,
    event_type text not null,
    user_id bigint not null,
    service_id integer not null,
    slate_id uuid,
    occurred_at timestamptz not null,
    payload jsonb,
    event_date date not null,
    extracted_at timestamptz not null default now()
);
create index raw_events_event_date on raw.events (event_date);

create table raw.bookings (
    booking_id bigint primary key,
    user_id bigint not null,
    service_id integer not null,
    slate_id uuid,
    price numeric(10, 2) not null,
    booked_at timestamptz not null,
    event_date date not null,
    extracted_at timestamptz not null default now()
);
create index raw_bookings_event_date on raw.bookings (event_date);

create table raw.reviews (
    review_id bigint primary key,
    booking_id bigint,
    user_id bigint not null,
    service_id integer not null,
    rating smallint not null,
    body text,
    created_at timestamptz not null,
    event_date date not null,
    extracted_at timestamptz not null default now()
);
create index raw_reviews_event_date on raw.reviews (event_date);

-- Rows of a source table that did not fit, with the reason; nothing is dropped.
create table raw.quarantine (
    source_table text not null,
    source_id bigint,
    event_date date not null,
    reason text not null,
    row_data jsonb not null,
    run_id text not null,
    quarantined_at timestamptz not null default now()
);
create index raw_quarantine_date on raw.quarantine (event_date, source_table);

-- Accounting of each extraction: read = accepted + quarantined, per table and day.
create table raw.extract_runs (
    event_date date not null,
    source_table text not null,
    run_id text not null,
    rows_read integer not null,
    rows_accepted integer not null,
    rows_quarantined integer not null,
    extracted_at timestamptz not null default now(),
    primary key (event_date, source_table),
    check (rows_read = rows_accepted + rows_quarantined)
);
