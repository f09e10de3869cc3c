"""Faults: a process killed mid-way leaves nothing half-done, and its rerun completes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import UTC, date, datetime

import psycopg

from rec import publish
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


def _wait_for_killed_backends(url: str) -> None:
    """Wait until the server has noticed that the killed client is gone and rolled back."""
    with psycopg.connect(url, autocommit=True) as conn:
        _wait_for(lambda: conn.execute(
            "select count(*) from pg_stat_activity where datname = current_database()"
            " and pid <> pg_backend_pid() and backend_type = 'client backend'"
        ).fetchone()[0] == 0)


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

    _wait_for_killed_backends(fresh_database)
    with psycopg.connect(fresh_database) as conn:
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


PUBLISH_SCRIPT = """
import sys
from datetime import date
sys.path.insert(0, sys.argv[2])
from test_publish import _policy_world, _publish
from rec import publish
policy, users, items = _policy_world(int(sys.argv[3]), 300)
ranked = publish.rank_users(policy, users, items, 20, 0.1, seed=1)
_publish(sys.argv[1], date(2026, 3, 1), ranked, items, sys.argv[4])
"""


def _list_state(url: str) -> tuple:
    with psycopg.connect(url) as conn:
        return conn.execute(
            "select count(*), count(distinct user_id), min(model_version), max(model_version)"
            " from rec.recommendations where run_date = '2026-03-01'").fetchone()


def _kill_publish_when(url: str, users: int, version: str, backend_is_there) -> None:
    """Start a publish of `version` in a process of its own; SIGKILL it at a chosen point."""
    tests_dir = os.path.dirname(__file__)
    worker = subprocess.Popen(
        [sys.executable, "-c", PUBLISH_SCRIPT, url, tests_dir, str(users), version],
        start_new_session=True)
    try:
        _wait_for(backend_is_there)
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(timeout=30)


def _active(url: str, query_pattern: str, waiting: bool = False) -> bool:
    with psycopg.connect(url, autocommit=True) as probe:
        return probe.execute(
            "select count(*) from pg_stat_activity where pid <> pg_backend_pid()"
            " and state = 'active' and query ilike %s"
            " and (not %s or wait_event_type = 'Lock')",
            (query_pattern, waiting)).fetchone()[0] > 0


def test_publish_killed_at_copy_or_swap_leaves_the_previous_list_whole(fresh_database):
    import test_publish

    users = 30_000
    policy, user_set, items = test_publish._policy_world(users, 300)
    ranked = publish.rank_users(policy, user_set, items, 20, 0.1, seed=1)
    test_publish._publish(fresh_database, date(2026, 3, 1), ranked, items, "v1")
    complete_v1 = (users * 20, users, "v1", "v1")
    assert _list_state(fresh_database) == complete_v1

    # Killed while COPYing its rows into the staging table.
    _kill_publish_when(fresh_database, users, "v2",
                       lambda: _active(fresh_database, "copy rec.recommendations_%"))
    assert _list_state(fresh_database) == complete_v1

    # Killed inside the swap, blocked behind a reader that holds the table.
    reader = psycopg.connect(fresh_database)
    reader.execute("select count(*) from rec.recommendations")
    try:
        _kill_publish_when(fresh_database, users, "v2",
                           lambda: _active(fresh_database, "alter table%", waiting=True))
        assert reader.execute("select count(*) from rec.recommendations"
                              " where run_date = '2026-03-01'").fetchone()[0] == users * 20
    finally:
        reader.rollback()
        reader.close()
    _wait_for_killed_backends(fresh_database)
    assert _list_state(fresh_database) == complete_v1

    # The rerun publishes the whole new list.
    test_publish._publish(fresh_database, date(2026, 3, 1), ranked, items, "v2")
    assert _list_state(fresh_database) == (users * 20, users, "v2", "v2")
