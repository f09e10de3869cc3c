"""Nightly extraction: one day of app events into `raw`, idempotently.

Each event table's rows whose timestamp falls in the data interval are checked;
the rows that fit are copied into `raw`, the rest go to `raw.quarantine` with
the reason, and the counts are stored so that read = accepted + quarantined.
Everything for the day happens in one transaction that first removes what an
earlier run of the same day wrote, so a rerun changes nothing.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import date, datetime

import psycopg

from rec.db import transaction

log = logging.getLogger(__name__)

DIMENSIONS = ("topics", "experts", "services", "users")


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
        ),
    ),
)


def _reason_sql(table: EventTable) -> str:
    branches = " ".join(f"when {cond} then '{reason}'" for cond, reason in table.checks)
    return f"case {branches} end"


def _extract_table(
    conn: psycopg.Connection, table: EventTable, event_date: date, start: datetime,
    end: datetime, run_id: str,
) -> dict[str, int]:
    params = {"start": start, "end": end, "event_date": event_date, "run_id": run_id}
    conn.execute(f"delete from raw.{table.name} where event_date = %(event_date)s", params)
    conn.execute(
        "delete from raw.quarantine where source_table = %(source)s"
        " and event_date = %(event_date)s", {**params, "source": table.name})

    source_columns = ", ".join(f"s.{c}" for c in table.columns)
    conn.execute(
        f"create temporary table checked on commit drop as"
        f" select {source_columns}, {_reason_sql(table)} as reason, to_jsonb(s) as row_data"
        f" from app.{table.name} s"
        f" left join app.users u on u.user_id = s.user_id"
        f" left join app.services v on v.service_id = s.service_id"
        f" where s.{table.time_column} >= %(start)s and s.{table.time_column} < %(end)s",
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
        {**params, "source": table.name},
    ).rowcount
    read = conn.execute("select count(*) from checked").fetchone()[0]
    conn.execute("drop table checked")

    conn.execute(
        "insert into raw.extract_runs (event_date, source_table, run_id, rows_read,"
        " rows_accepted, rows_quarantined) values (%s, %s, %s, %s, %s, %s)"
        " on conflict (event_date, source_table) do update set run_id = excluded.run_id,"
        " rows_read = excluded.rows_read, rows_accepted = excluded.rows_accepted,"
        " rows_quarantined = excluded.rows_quarantined, extracted_at = now()",
        (event_date, table.name, run_id, read, accepted, quarantined),
    )
    return {"read": read, "accepted": accepted, "quarantined": quarantined}


def _quarantine_untimed(conn: psycopg.Connection, event_date: date, run_id: str) -> int:
    """Rows with no timestamp belong to no day: quarantine them once, on first sight."""
    total = 0
    for table in EVENT_TABLES:
        total += conn.execute(
            "insert into raw.quarantine (source_table, source_id, event_date, reason,"
            " row_data, run_id)"
            f" select %(source)s, s.{table.key}, %(event_date)s, 'missing timestamp',"
            " to_jsonb(s), %(run_id)s"
            f" from app.{table.name} s where s.{table.time_column} is null"
            " and not exists (select 1 from raw.quarantine q where q.source_table ="
            f" %(source)s and q.source_id = s.{table.key} and q.event_date <> %(event_date)s)",
            {"source": table.name, "event_date": event_date, "run_id": run_id},
        ).rowcount
    return total


def extract_day(
    start: datetime, end: datetime, run_id: str, url: str | None = None
) -> dict[str, dict[str, int]]:
    """Copy the app's events with timestamps in [start, end) into `raw`.

    Args:
        start: beginning of the data interval (inclusive).
        end: end of the data interval (exclusive).
        run_id: the id of the pipeline run, stored with every quarantined row.
        url: the database; the configured one when None.

    Returns:
        Per table, the rows read, accepted and quarantined.
    """
    started = time.perf_counter()
    event_date = start.date()
    summary: dict[str, dict[str, int]] = {}
    with transaction(url) as conn:
        # One extraction of a day at a time; a concurrent rerun waits here.
        conn.execute("select pg_advisory_xact_lock(hashtext('rec.extract'), %s)",
                     (event_date.toordinal(),))
        for name in DIMENSIONS:
            conn.execute(f"delete from raw.{name}")
            conn.execute(f"insert into raw.{name} select * from app.{name}")
        for table in EVENT_TABLES:
            summary[table.name] = _extract_table(conn, table, event_date, start, end, run_id)
        untimed = _quarantine_untimed(conn, event_date, run_id)
        if untimed:
            summary["untimed"] = {"read": untimed, "accepted": 0, "quarantined": untimed}
    log.info(
        "extracted %s: %s in %.2fs", event_date,
        ", ".join(f"{t} {c['accepted']}/{c['read']}" for t, c in summary.items()),
        time.perf_counter() - started,
    )
    return summary
