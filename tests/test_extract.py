"""Extraction copies one day into `raw`, quarantines what does not fit, and reruns cleanly."""

from __future__ import annotations

from datetime import UTC, date, datetime

import psycopg

from rec.extract import extract_day
from rec.world.generate import WorldSpec, seed_world
from rec.world.traffic import simulate_day

DAY_START = datetime(2026, 1, 1, tzinfo=UTC)
DAY_END = datetime(2026, 1, 2, tzinfo=UTC)


def _snapshot(conn) -> dict:
    return {t: conn.execute(f"select count(*), "
                            f" coalesce(sum(hashtext((to_jsonb(r) - 'extracted_at')::text)), 0)"
                            f" from {t} r").fetchone()
            for t in ("raw.impressions", "raw.events", "raw.bookings", "raw.reviews",
                      "raw.users", "raw.services")}


def test_rerun_of_a_day_changes_nothing(fresh_database):
    with psycopg.connect(fresh_database) as conn:
        seed_world(conn, WorldSpec(users=200, experts=15, seed=2))
        simulate_day(conn, date(2026, 1, 1))
        simulate_day(conn, date(2026, 1, 2))
        conn.commit()

    first = extract_day(DAY_START, DAY_END, "run-a")
    with psycopg.connect(fresh_database) as conn:
        before = _snapshot(conn)
        app_count = conn.execute("select count(*) from app.impressions where shown_at >= %s"
                                 " and shown_at < %s", (DAY_START, DAY_END)).fetchone()[0]
        other_days = conn.execute("select count(*) from raw.impressions"
                                  " where event_date <> '2026-01-01'").fetchone()[0]
    second = extract_day(DAY_START, DAY_END, "run-b")
    with psycopg.connect(fresh_database) as conn:
        after = _snapshot(conn)

    assert first == second
    assert before == after
    assert first["impressions"]["accepted"] == app_count > 0
    assert other_days == 0


def test_bad_rows_are_quarantined_with_their_reason(fresh_database):
    with psycopg.connect(fresh_database) as conn:
        seed_world(conn, WorldSpec(users=100, experts=10, seed=4))
        simulate_day(conn, date(2026, 1, 1))
        at = datetime(2026, 1, 1, 12, tzinfo=UTC)
        bad = [
            ("click", 999_999, 1, at, "unknown user_id"),
            ("click", 1, 999_999, at, "unknown service_id"),
            ("tap", 1, 1, at, "unknown event_type"),
            ("click", None, 1, at, "missing user_id"),
            ("like", 1, 1, None, "missing timestamp"),
        ]
        for event_type, user, service, when, _ in bad:
            conn.execute("insert into app.events (event_type, user_id, service_id, occurred_at)"
                         " values (%s, %s, %s, %s)", (event_type, user, service, when))
        conn.execute("insert into app.reviews (user_id, service_id, rating, created_at)"
                     " values (1, 1, 9, %s)", (at,))
        conn.commit()

    summary = extract_day(DAY_START, DAY_END, "run-q")
    extract_day(DAY_START, DAY_END, "run-q2")
    with psycopg.connect(fresh_database) as conn:
        reasons = sorted(r[0] for r in conn.execute("select reason from raw.quarantine"))
        accounting = conn.execute(
            "select bool_and(rows_read = rows_accepted + rows_quarantined),"
            " sum(rows_quarantined) from raw.extract_runs").fetchone()
        leaked = conn.execute("select count(*) from raw.events where user_id = 999999"
                              " or service_id = 999999 or event_type = 'tap'").fetchone()[0]

    assert reasons == sorted([b[4] for b in bad] + ["rating outside 1..5"])
    # The event without a timestamp is read and quarantined by the first day that sees it.
    assert summary["events"]["quarantined"] == 5
    assert accounting == (True, 6)
    assert leaked == 0


def test_a_row_without_timestamp_is_counted_by_one_day_only(fresh_database):
    with psycopg.connect(fresh_database) as conn:
        seed_world(conn, WorldSpec(users=50, experts=5, seed=5))
        untimed = conn.execute("insert into app.bookings (user_id, service_id, price)"
                               " values (1, 1, 10) returning booking_id").fetchone()[0]
        conn.commit()

    first = extract_day(DAY_START, DAY_END, "day-1")
    second = extract_day(DAY_END, datetime(2026, 1, 3, tzinfo=UTC), "day-2")
    rerun = extract_day(DAY_START, DAY_END, "day-1-again")
    with psycopg.connect(fresh_database) as conn:
        quarantined = conn.execute(
            "select source_id, event_date, reason, run_id from raw.quarantine").fetchall()

    assert first["bookings"] == rerun["bookings"] == {"read": 1, "accepted": 0,
                                                       "quarantined": 1}
    assert second["bookings"] == {"read": 0, "accepted": 0, "quarantined": 0}
    assert quarantined == [(untimed, date(2026, 1, 1), "missing timestamp", "day-1-again")]
