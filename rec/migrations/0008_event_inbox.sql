-- What the app's event collector receives, exactly as the client sent it. Every field is
-- text and nothing is unique, so a duplicate, malformed or oversized event still lands
-- here, and the nightly extraction can quarantine it with its reason instead of the
-- collector rejecting it unseen. Rows are appended, never updated; a row belongs to the
-- day of its received_at, which the collector sets and the client cannot.
create table app.event_inbox (
    inbox_id bigint generated always as identity primary key,
    received_at timestamptz not null default clock_timestamp(),
    event_id text,
    event_type text,
    user_id text,
    service_id text,
    slate_id text,
    occurred_at text,
    payload text
);
create index event_inbox_received_at on app.event_inbox (received_at);
-- A hash index has no size limit per entry, so even an oversized event_id can land; the
-- extraction looks up earlier copies of an event_id by equality only.
create index event_inbox_event_id on app.event_inbox using hash (event_id);

-- Guarded casts for the extraction's checks: null where the text is not a value of the
-- type, instead of an error that would stop the whole night. They work on PostgreSQL 15,
-- which lacks pg_input_is_valid and the IS JSON predicate. Each call opens a
-- subtransaction for its handler, which makes them parallel unsafe and not free: the
-- extraction calls them only on timestamps of the right shape and on payloads within the
-- size limit.
create function raw.try_jsonb(value text) returns jsonb
language plpgsql immutable strict parallel unsafe as $$
begin
    return value::jsonb;
exception when data_exception or program_limit_exceeded then
    return null;
end;
$$;

create function raw.try_timestamptz(value text) returns timestamptz
language plpgsql stable strict parallel unsafe as $$
begin
    return value::timestamptz;
exception when data_exception then
    return null;
end;
$$;

-- Finds whether a source row was already quarantined (rows without a timestamp are
-- quarantined once, by the first run that sees them).
create index raw_quarantine_source on raw.quarantine (source_table, source_id);
