"""The world is seeded and played deterministically."""

from __future__ import annotations

from datetime import date

import psycopg

from rec.world.generate import WorldSpec, seed_world
from rec.world.traffic import simulate_day

TABLES = ("app.users", "app.services", "app.impressions", "app.events", "app.bookings",
          "app.reviews")


def _play(url: str, days: int) -> dict:
    with psycopg.connect(url) as conn:
        seed_world(conn, WorldSpec(users=300, experts=20, seed=7))
        for d in range(days):
            simulate_day(conn, date(2026, 1, 1 + d))
        conn.commit()
        counts = {t: conn.execute(f"select count(*) from {t}").fetchone()[0] for t in TABLES}
        counts["clicked"] = conn.execute(
            "select array_agg(service_id order by occurred_at) from app.events"
            " where event_type = 'click'").fetchone()[0]
        counts["truth"] = conn.execute(
            "select sum(activity) from world.user_truth").fetchone()[0]
    return counts


def test_same_seed_same_world(fresh_database, server_url):
    first = _play(fresh_database, days=2)
    with psycopg.connect(fresh_database) as conn:
        for table in ("world.days", "world.user_truth", "world.expert_truth", "world.settings",
                      *reversed(TABLES), "app.experts", "app.topics"):
            conn.execute(f"delete from {table}")
        conn.commit()
    second = _play(fresh_database, days=2)
    assert first == second
    assert first["app.impressions"] > 0 and first["app.bookings"] > 0


def test_a_day_is_played_once(fresh_database):
    with psycopg.connect(fresh_database) as conn:
        seed_world(conn, WorldSpec(users=50, experts=5, seed=1))
        simulate_day(conn, date(2026, 1, 1))
        try:
            simulate_day(conn, date(2026, 1, 1))
        except RuntimeError as error:
            assert "already simulated" in str(error)
        else:
            raise AssertionError("a replayed day must be refused")


def test_slates_are_valid(fresh_database):
    with psycopg.connect(fresh_database) as conn:
        seed_world(conn, WorldSpec(users=200, experts=15, seed=3))
        simulate_day(conn, date(2026, 1, 1))
        bad = conn.execute(
            "select count(*) from (select slate_id from app.impressions group by slate_id"
            " having count(distinct service_id) <> count(*) or min(position) <> 0"
            " or max(propensity) > 1 or min(propensity) <= 0) s").fetchone()[0]
        clicks_outside_slate = conn.execute(
            "select count(*) from app.events e where not exists (select 1 from app.impressions"
            " i where i.slate_id = e.slate_id and i.service_id = e.service_id)").fetchone()[0]
    assert bad == 0
    assert clicks_outside_slate == 0
