"""Faults: a process killed mid-way leaves nothing half-done, and its rerun completes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import UTC, date, datetime

import psycopg

from rec.extract import extract_day
from rec.world.generate import WorldSpec, seed_world
from rec.world.traffic import simulate_day

DAY_START = datetime(2026, 1, 1, tzinfo=UTC)
DAY_END = datetime(2026, 1, 2, tzinfo=UTC)
EVENT_TABLES = ("raw.impressions", "raw.events", "raw.bookings", "raw.reviews")

EXTRACT_SCRIPT = """
import sys
from datetime import datetime, UTC
from rec.extract import extract_day
extract_day(datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 2, tzinfo=UTC), "killed",
            sys.argv[1])
"""


def _counts(conn) -> dict[str, int]:
    return {t: conn.execute(f"select count(*) from {t} where event_date = '2026-01-01'"
                            ).fetchone()[0] for t in EVENT_TABLES}


def _wait_for(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.05)


def test_extraction_killed_halfway_reruns_to_the_counts_of_an_uninterrupted_run(
        fresh_database):
    with psycopg.connect(fresh_database) as conn:
        seed_world(conn, WorldSpec(users=400, experts=20, seed=9))
        simulate_day(conn, date(2026, 1, 1))
        conn.commit()

    # Hold the last table the extraction writes, so that it blocks there with the
    # impressions, clicks and bookings of the day already written in its transaction.
    blocker = psycopg.connect(fresh_database)
    blocker.execute("lock table raw.reviews in access exclusive mode")
    worker = subprocess.Popen([sys.executable, "-c", EXTRACT_SCRIPT, fresh_database],
                              start_new_session=True)
    try:
        def waiting_on_reviews() -> bool:
            with psycopg.connect(fresh_database, autocommit=True) as probe:
                return probe.execute(
                    "select count(*) from pg_stat_activity where wait_event_type = 'Lock'"
                    " and query ilike '%%raw.reviews%%' and pid <> pg_backend_pid()"
                ).fetchone()[0] > 0

        _wait_for(waiting_on_reviews)
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(timeout=30)
    finally:
        blocker.rollback()
        blocker.close()

    with psycopg.connect(fresh_database, autocommit=True) as conn:
        _wait_for(lambda: conn.execute(
            "select count(*) from pg_stat_activity where datname = current_database()"
            " and pid <> pg_backend_pid() and backend_type = 'client backend'"
        ).fetchone()[0] == 0)
        assert _counts(conn) == dict.fromkeys(EVENT_TABLES, 0)
        assert conn.execute("select count(*) from raw.extract_runs").fetchone()[0] == 0

    rerun = extract_day(DAY_START, DAY_END, "rerun")
    with psycopg.connect(fresh_database) as conn:
        after_rerun = _counts(conn)
        app = {
            "raw.impressions": "select count(*) from app.impressions where shown_at < %s",
            "raw.events": "select count(*) from app.events where occurred_at < %s",
            "raw.bookings": "select count(*) from app.bookings where booked_at < %s",
            "raw.reviews": "select count(*) from app.reviews where created_at < %s",
        }
        expected = {t: conn.execute(q, (DAY_END,)).fetchone()[0] for t, q in app.items()}
    assert after_rerun == expected
    assert all(rerun[t.split(".")[1]]["quarantined"] == 0 for t in EVENT_TABLES)
    assert extract_day(DAY_START, DAY_END, "again") == rerun
