"""Nightly extraction: one day of app events into `raw`, idempotently.

Two sources feed the same raw tables. The typed event tables (impressions, events,
bookings, reviews) are read by their timestamp; `app.event_inbox`, where the event
collector lands what clients send as plain text, is read by the time each row was
received. Every row is checked in SQL: the rows that fit are copied into `raw`, the rest
go to `raw.quarantine` with the reason and the run's id, and `raw.extract_runs` stores,
per source and day, read = accepted + quarantined. Everything for the day happens in one
transaction that first removes what an earlier run of the same day wrote, so a rerun
changes nothing.

Text is data: it reaches the database only as bound parameters and jsonb values, never as
SQL text, so a review reading `'); drop table app.users; --` is stored as written.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from datetime import date, datetime, timedelta

import psycopg

from rec.db import transaction

log = logging.getLogger(__name__)

DIMENSIONS = ("topics", "experts", "services", "users")

INBOX = "event_inbox"
# The event types the inbox takes, and the raw table each one's good rows join.
INBOX_TARGETS = {"click": "events", "like": "events", "booking": "bookings",
                 "review": "reviews"}

# Control characters other than tab and line feed, C1 controls included.
CONTROL_PATTERN = r"[\x01-\x08\x0b-\x1f\x7f-\x9f]"
# The shapes below avoid counted repetitions such as {0,17}: PostgreSQL's regex engine
# unrolls them into large automata, which made matching noticeably slower.
# Digits only, no sign, no leading zero; lengths are checked beside the pattern.
ID_PATTERN = r"^[1-9][0-9]*$"
_HEX = "[0-9a-fA-F]+"
UUID_PATTERN = rf"^{_HEX}-{_HEX}-{_HEX}-{_HEX}-{_HEX}$"
# ISO 8601 date and time; an event time must name its offset from UTC.
_D2 = "[0-9][0-9]"
_ISO_LOCAL = rf"{_D2}{_D2}-{_D2}-{_D2}[T ]{_D2}:{_D2}(:{_D2}(\.[0-9]+)?)?"
TIMESTAMP_PATTERN = rf"^{_ISO_LOCAL}(Z|[+-]{_D2}(:?{_D2})?)$"
NAIVE_TIMESTAMP_PATTERN = rf"^{_ISO_LOCAL}$"


@dataclass(frozen=True)
class InboxRules:
    """Limits on what clients send through the event inbox."""

    max_payload_bytes: int = 16 * 1024
    """Longest payload accepted, in bytes of its text."""
    clock_skew: timedelta = timedelta(minutes=5)
    """How far an event's time may lie after the time it was received (client clocks)."""
    max_lateness: timedelta = timedelta(days=7)
    """How long before it was received an event may have happened (offline clients)."""

    @classmethod
    def from_env(cls) -> InboxRules:
        """The default rules, overridden where the environment sets them.

        Reads `REC_INBOX_MAX_PAYLOAD_BYTES`, `REC_INBOX_CLOCK_SKEW_SECONDS` and
        `REC_INBOX_MAX_LATENESS_HOURS`.
        """
        rules = cls()
        env = os.environ.get
        return cls(
            max_payload_bytes=int(env("REC_INBOX_MAX_PAYLOAD_BYTES", rules.max_payload_bytes)),
            clock_skew=timedelta(seconds=float(
                env("REC_INBOX_CLOCK_SKEW_SECONDS", rules.clock_skew.total_seconds()))),
            max_lateness=timedelta(hours=float(
                env("REC_INBOX_MAX_LATENESS_HOURS", rules.max_lateness.total_seconds() / 3600))),
        )


@dataclass(frozen=True)
class EventTable:
    """How one app event table is extracted and checked."""

    name: str
    key: str
    time_column: str
    columns: tuple[str, ...]
    checks: tuple[tuple[str, str], ...]
    """(SQL condition that marks a bad row, reason), tried in order."""


_COMMON_CHECKS = (
    ("s.user_id is null", "missing user_id"),
    ("s.service_id is null", "missing service_id"),
    ("u.user_id is null", "unknown user_id"),
    ("v.service_id is null", "unknown service_id"),
)

_CONTROL_IN_JSON = (
    "exists (select 1 from jsonb_path_query({json}, 'strict $.**') as v"
    " where jsonb_typeof(v) = 'string' and v #>> '{{}}' ~ %(control_pattern)s)"
)

EVENT_TABLES = (
    EventTable(
        "impressions", "impression_id", "shown_at",
        ("impression_id", "slate_id", "user_id", "service_id", "position", "propensity",
         "source", "shown_at"),
        _COMMON_CHECKS + (
            ("s.position < 0", "negative position"),
            ("s.propensity is not null and not (s.propensity > 0 and s.propensity <= 1)",
             "propensity outside (0, 1]"),
        ),
    ),
    EventTable(
        "events", "event_id", "occurred_at",
        ("event_id", "event_type", "user_id", "service_id", "slate_id", "occurred_at",
         "payload"),
        _COMMON_CHECKS + (
            ("s.event_type not in ('click', 'like')", "unknown event_type"),
            (_CONTROL_IN_JSON.format(json="s.payload"), "control characters in text"),
        ),
    ),
    EventTable(
        "bookings", "booking_id", "booked_at",
        ("booking_id", "user_id", "service_id", "slate_id", "price", "booked_at"),
        _COMMON_CHECKS + (
            ("s.price is null or s.price < 0", "missing or negative price"),
        ),
    ),
    EventTable(
        "reviews", "review_id", "created_at",
        ("review_id", "booking_id", "user_id", "service_id", "rating", "body", "created_at"),
        _COMMON_CHECKS + (
            ("s.rating is null or s.rating not between 1 and 5", "rating outside 1..5"),
            ("s.body ~ %(control_pattern)s", "control characters in text"),
        ),
    ),
)

# Checks of an inbox row, in order; the first that holds is the reason. `p` is the row
# with `ts` (its time) and `j` (its payload) already parsed by guarded casts, and
# price, duration, rating and booking_ref taken from the payload where they are JSON
# numbers. Casts of the text ids appear only after the checks that prove them castable:
# CASE evaluates its conditions in order and stops at the first that holds.
# Limitation: inbox ids and the typed tables' ids share raw's keys. A collision is
# quarantined as a duplicate instead of failing the night, but which of the two rows is
# kept then depends on which of their nights was extracted first.
_RAW_KEY = {"events": "event_id", "bookings": "booking_id", "reviews": "review_id"}
_ALREADY_EXTRACTED = "case p.event_type {} end".format(" ".join(
    f"when '{event_type}' then exists (select 1 from raw.{table} r"
    f" where r.{_RAW_KEY[table]} = p.event_id::bigint)"
    for event_type, table in INBOX_TARGETS.items()))

INBOX_CHECKS: tuple[tuple[str, str], ...] = (
    ("p.event_id is null or p.event_id = ''", "missing event_id"),
    ("p.event_id !~ %(id_pattern)s or length(p.event_id) > 18", "malformed event_id"),
    # The first copy of an event id (by received_at, then inbox_id) is the event; every
    # later copy is a duplicate, whatever became of the first.
    ("exists (select 1 from app.event_inbox e where e.event_id = p.event_id"
     " and (e.received_at, e.inbox_id) < (p.received_at, p.inbox_id))", "duplicate event_id"),
    ("p.event_type is null or p.event_type = ''", "missing event_type"),
    ("p.event_type not in ({})".format(", ".join(f"'{t}'" for t in INBOX_TARGETS)),
     "unknown event_type"),
    # The same id already extracted from the typed tables, or by an earlier day.
    (_ALREADY_EXTRACTED, "duplicate event_id"),
    ("p.user_id is null or p.user_id = ''", "missing user_id"),
    ("p.user_id !~ %(id_pattern)s or length(p.user_id) > 18", "malformed user_id"),
    ("p.service_id is null or p.service_id = ''", "missing service_id"),
    ("p.service_id !~ %(id_pattern)s or length(p.service_id) > 10", "malformed service_id"),
    ("p.service_id::bigint > 2147483647", "malformed service_id"),
    ("p.slate_id !~ %(uuid_pattern)s or length(p.slate_id) <> 36 or substr(p.slate_id, 9, 1)"
     " || substr(p.slate_id, 14, 1) || substr(p.slate_id, 19, 1) || substr(p.slate_id, 24, 1)"
     " <> '----'", "malformed slate_id"),
    ("p.occurred_at is null or p.occurred_at = ''", "missing timestamp"),
    ("p.ts is null and p.occurred_at ~ %(naive_timestamp_pattern)s",
     "timestamp without time zone"),
    ("p.ts is null and p.occurred_at !~ %(timestamp_pattern)s", "malformed timestamp"),
    ("p.ts is null", "invalid date or time"),
    ("p.ts > p.received_at + %(clock_skew)s", "timestamp in the future"),
    ("p.ts < p.received_at - %(max_lateness)s", "timestamp too old"),
    ("octet_length(p.payload) > %(max_payload_bytes)s", "payload too large"),
    ("p.payload is not null and p.j is null", "malformed payload JSON"),
    ("jsonb_typeof(p.j) <> 'object'", "payload is not a JSON object"),
    # Limitation: only the payload's string values are searched, not its object keys.
    (_CONTROL_IN_JSON.format(json="p.j"), "control characters in text"),
    ("p.event_type = 'booking' and coalesce(p.j -> 'price', 'null') = 'null'",
     "missing price"),
    ("p.event_type = 'booking' and p.price is null", "malformed price"),
    ("p.event_type = 'booking' and p.price < 0", "negative price"),
    ("p.event_type = 'booking' and p.price >= 1e8", "price out of range"),
    ("p.event_type = 'booking' and p.price <> round(p.price, 2)",
     "price with fractions of a cent"),
    # Limitation: the duration is checked but not kept; raw.bookings has no column for it
    # (the booked service sets a session's length).
    ("p.event_type = 'booking' and p.j ? 'duration_minutes'"
     " and (p.duration is null or p.duration <> trunc(p.duration))", "malformed duration"),
    ("p.event_type = 'booking' and p.duration <= 0", "negative or zero duration"),
    ("p.event_type = 'booking' and p.duration > 1440", "duration over 24 hours"),
    ("p.event_type = 'review' and coalesce(p.j -> 'rating', 'null') = 'null'",
     "missing rating"),
    ("p.event_type = 'review' and (p.rating is null or p.rating <> trunc(p.rating))",
     "malformed rating"),
    ("p.event_type = 'review' and p.rating not between 1 and 5", "rating outside 1..5"),
    ("p.event_type = 'review' and jsonb_typeof(p.j -> 'body') not in ('string', 'null')",
     "body is not a string"),
    ("p.event_type = 'review' and coalesce(p.j -> 'booking_id', 'null') <> 'null'"
     " and (p.booking_ref is null or p.booking_ref <> trunc(p.booking_ref)"
     " or p.booking_ref not between 1 and 999999999999999999)", "malformed booking_id"),
    ("not exists (select 1 from app.users u where u.user_id = p.user_id::bigint)",
     "unknown user_id"),
    ("not exists (select 1 from app.services v where v.service_id = p.service_id::integer)",
     "unknown service_id"),
)


def _case(checks: tuple[tuple[str, str], ...]) -> str:
    branches = " ".join(f"when {cond} then '{reason}'" for cond, reason in checks)
    return f"case {branches} end"


def _check_params(rules: InboxRules) -> dict[str, object]:
    return {
        "control_pattern": CONTROL_PATTERN,
        "id_pattern": ID_PATTERN,
        "uuid_pattern": UUID_PATTERN,
        "timestamp_pattern": TIMESTAMP_PATTERN,
        "naive_timestamp_pattern": NAIVE_TIMESTAMP_PATTERN,
        "clock_skew": rules.clock_skew,
        "max_lateness": rules.max_lateness,
        "max_payload_bytes": rules.max_payload_bytes,
    }


def _record_run(
    conn: psycopg.Connection, event_date: date, source: str, run_id: str, counts: dict[str, int]
) -> None:
    conn.execute(
        "insert into raw.extract_runs (event_date, source_table, run_id, rows_read,"
        " rows_accepted, rows_quarantined) values (%s, %s, %s, %s, %s, %s)"
        " on conflict (event_date, source_table) do update set run_id = excluded.run_id,"
        " rows_read = excluded.rows_read, rows_accepted = excluded.rows_accepted,"
        " rows_quarantined = excluded.rows_quarantined, extracted_at = now()",
        (event_date, source, run_id, counts["read"], counts["accepted"],
         counts["quarantined"]),
    )


def _extract_table(
    conn: psycopg.Connection, table: EventTable, event_date: date, start: datetime,
    end: datetime, run_id: str, check_params: dict[str, object],
) -> dict[str, int]:
    params = {**check_params, "start": start, "end": end, "event_date": event_date,
              "run_id": run_id, "source": table.name}
    conn.execute(f"delete from raw.{table.name} where event_date = %(event_date)s", params)
    conn.execute(
        "delete from raw.quarantine where source_table = %(source)s"
        " and event_date = %(event_date)s", params)

    # A row without a timestamp belongs to no day: the first run that sees it quarantines
    # it and counts it, later days skip it. A row whose id raw already holds (from the
    # inbox, or under another day) is a duplicate rather than a key violation.
    checks = (
        (f"s.{table.time_column} is null", "missing timestamp"),
        *table.checks,
        (f"d.{table.key} is not null", f"duplicate {table.key}"),
    )
    source_columns = ", ".join(f"s.{c}" for c in table.columns)
    conn.execute(
        f"create temporary table checked on commit drop as"
        f" select {source_columns}, {_case(checks)} as reason, to_jsonb(s) as row_data"
        f" from app.{table.name} s"
        f" left join app.users u on u.user_id = s.user_id"
        f" left join app.services v on v.service_id = s.service_id"
        f" left join raw.{table.name} d on d.{table.key} = s.{table.key}"
        f" where (s.{table.time_column} >= %(start)s and s.{table.time_column} < %(end)s)"
        f" or (s.{table.time_column} is null and not exists (select 1 from raw.quarantine q"
        f" where q.source_table = %(source)s and q.source_id = s.{table.key}))",
        params,
    )
    column_list = ", ".join(table.columns)
    accepted = conn.execute(
        f"insert into raw.{table.name} ({column_list}, event_date)"
        f" select {column_list}, %(event_date)s from checked where reason is null",
        params,
    ).rowcount
    quarantined = conn.execute(
        "insert into raw.quarantine (source_table, source_id, event_date, reason, row_data,"
        " run_id)"
        f" select %(source)s, {table.key}, %(event_date)s, reason, row_data, %(run_id)s"
        " from checked where reason is not null",
        params,
    ).rowcount
    read = conn.execute("select count(*) from checked").fetchone()[0]
    conn.execute("drop table checked")

    counts = {"read": read, "accepted": accepted, "quarantined": quarantined}
    _record_run(conn, event_date, table.name, run_id, counts)
    return counts


_INBOX_PARSED = """
create temporary table inbox_checked on commit drop as
with parsed as materialized (
    select
        i.*,
        to_jsonb(i) as row_data,
        case when i.occurred_at ~ %(timestamp_pattern)s
            then raw.try_timestamptz(i.occurred_at) end as ts,
        case when octet_length(i.payload) <= %(max_payload_bytes)s
            then raw.try_jsonb(i.payload) end as j
    from app.event_inbox as i
    where i.received_at >= %(start)s and i.received_at < %(end)s
),
fields as (
    select
        parsed.*,
        case when jsonb_typeof(j -> 'price') = 'number'
            then (j ->> 'price')::numeric end as price,
        case when jsonb_typeof(j -> 'duration_minutes') = 'number'
            then (j ->> 'duration_minutes')::numeric end as duration,
        case when jsonb_typeof(j -> 'rating') = 'number'
            then (j ->> 'rating')::numeric end as rating,
        case when jsonb_typeof(j -> 'booking_id') = 'number'
            then (j ->> 'booking_id')::numeric end as booking_ref
    from parsed
)
select
    p.inbox_id, p.event_id, p.event_type, p.user_id, p.service_id, p.slate_id,
    p.ts as occurred_at, p.j as payload, p.price, p.rating, p.booking_ref,
    {reason} as reason,
    p.row_data
from fields as p
"""

# Accepted inbox rows, cast into each raw table; only rows that passed every check.
_INBOX_INSERTS = (
    "insert into raw.events (event_id, event_type, user_id, service_id, slate_id,"
    " occurred_at, payload, event_date)"
    " select event_id::bigint, event_type, user_id::bigint, service_id::integer,"
    " slate_id::uuid, occurred_at, payload, %(event_date)s from inbox_checked"
    " where reason is null and event_type in ('click', 'like')",
    "insert into raw.bookings (booking_id, user_id, service_id, slate_id, price, booked_at,"
    " event_date)"
    " select event_id::bigint, user_id::bigint, service_id::integer, slate_id::uuid, price,"
    " occurred_at, %(event_date)s from inbox_checked"
    " where reason is null and event_type = 'booking'",
    "insert into raw.reviews (review_id, booking_id, user_id, service_id, rating, body,"
    " created_at, event_date)"
    " select event_id::bigint, booking_ref::bigint, user_id::bigint, service_id::integer,"
    " rating::smallint, payload ->> 'body', occurred_at, %(event_date)s from inbox_checked"
    " where reason is null and event_type = 'review'",
)


def _extract_inbox(
    conn: psycopg.Connection, event_date: date, start: datetime, end: datetime,
    run_id: str, check_params: dict[str, object],
) -> dict[str, int]:
    """Check the inbox rows received in [start, end) and copy the good ones into `raw`.

    Runs after the typed tables, whose rows of the day it must not duplicate.
    """
    # Limitation: checking text costs: `bench/extract_inbox.py` measured this path at about
    # a fifth of the typed path's rows per second (guarded casts, regexes, a lookup of
    # earlier copies per row), which a day of many millions of inbox rows would feel.
    params = {**check_params, "start": start, "end": end, "event_date": event_date,
              "run_id": run_id, "source": INBOX}
    conn.execute(
        "delete from raw.quarantine where source_table = %(source)s"
        " and event_date = %(event_date)s", params)
    conn.execute(_INBOX_PARSED.format(reason=_case(INBOX_CHECKS)), params)

    accepted = sum(conn.execute(insert, params).rowcount for insert in _INBOX_INSERTS)
    quarantined = conn.execute(
        "insert into raw.quarantine (source_table, source_id, event_date, reason, row_data,"
        " run_id)"
        " select %(source)s, inbox_id, %(event_date)s, reason, row_data, %(run_id)s"
        " from inbox_checked where reason is not null",
        params,
    ).rowcount
    read = conn.execute("select count(*) from inbox_checked").fetchone()[0]
    conn.execute("drop table inbox_checked")

    counts = {"read": read, "accepted": accepted, "quarantined": quarantined}
    # raw.extract_runs refuses counts that do not add up, which rolls the whole day back.
    _record_run(conn, event_date, INBOX, run_id, counts)
    return counts


def extract_day(
    start: datetime, end: datetime, run_id: str, url: str | None = None,
    rules: InboxRules | None = None,
) -> dict[str, dict[str, int]]:
    """Copy the app's events of [start, end) into `raw`.

    Typed event rows are taken by their timestamp, inbox rows by the time they were
    received.

    Args:
        start: beginning of the data interval (inclusive).
        end: end of the data interval (exclusive).
        run_id: the id of the pipeline run, stored with every quarantined row.
        url: the database; the configured one when None.
        rules: limits on inbox rows; `InboxRules.from_env()` when None.

    Returns:
        Per source table (the four event tables and `event_inbox`), the rows read,
        accepted and quarantined.
    """
    started = time.perf_counter()
    event_date = start.date()
    check_params = _check_params(rules or InboxRules.from_env())
    summary: dict[str, dict[str, int]] = {}
    with transaction(url) as conn:
        # One extraction of a day at a time; a concurrent rerun waits here.
        conn.execute("select pg_advisory_xact_lock(hashtext('rec.extract'), %s)",
                     (event_date.toordinal(),))
        for name in DIMENSIONS:
            conn.execute(f"delete from raw.{name}")
            conn.execute(f"insert into raw.{name} select * from app.{name}")
        for table in EVENT_TABLES:
            summary[table.name] = _extract_table(
                conn, table, event_date, start, end, run_id, check_params)
        summary[INBOX] = _extract_inbox(conn, event_date, start, end, run_id, check_params)
    log.info(
        "extracted %s: %s in %.2fs", event_date,
        ", ".join(f"{t} {c['accepted']}/{c['read']}" for t, c in summary.items()),
        time.perf_counter() - started,
    )
    return summary
