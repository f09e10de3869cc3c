"""The world is seeded and played deterministically."""

from __future__ import annotations

from datetime import date

import numpy as np
import psycopg

from rec.world.generate import WORLD_SCHEMA_SQL, WorldSpec, seed_world
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
            "select sum(activity), sum(budget), count(churned_on) from world.user_truth"
        ).fetchone()
        counts["jumps"] = conn.execute(
            "select array_agg(user_id order by user_id, day) from world.interest_jumps"
        ).fetchone()[0]
    return counts


def test_same_seed_same_world(fresh_database, server_url):
    first = _play(fresh_database, days=2)
    with psycopg.connect(fresh_database) as conn:
        for table in ("world.interest_jumps", "world.days", "world.user_truth",
                      "world.expert_truth", "world.settings",
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


def _seed_and_play(conn, spec: WorldSpec, days: int) -> list[dict]:
    seed_world(conn, spec)
    return [simulate_day(conn, date(2026, 1, 1 + d)) for d in range(days)]


def test_interests_jump_at_the_daily_rate(fresh_database):
    rate, users, days = 0.02, 2000, 3
    with psycopg.connect(fresh_database) as conn:
        counts = _seed_and_play(conn, WorldSpec(users=users, experts=20, seed=11,
                                                jump_rate=rate), days)
        jumps = conn.execute(
            "select j.from_topic, j.to_topic, t.interests from world.interest_jumps j"
            " join world.user_truth t using (user_id)").fetchall()
        per_day = conn.execute(
            "select day, count(*) from world.interest_jumps group by day order by day").fetchall()

    expected = rate * users * days
    # Binomial: four standard deviations either side.
    assert abs(len(jumps) - expected) < 4 * (expected * (1 - rate)) ** 0.5
    assert [c for _, c in per_day] == [c["jumps"] for c in counts]
    assert all(old != new for old, new, _ in jumps)
    # The new topic took the old favourite's weight and is the favourite now (drift towards
    # what a user books may tip a close call back on the following days).
    favourite = sum(max(range(len(i)), key=i.__getitem__) == new for _, new, i in jumps)
    assert favourite / len(jumps) > 0.95
    # The old favourite kept the new topic's weight, which the sparse draw makes small.
    assert np.median([i[old] for old, _, i in jumps]) < 0.1


def test_new_users_sign_up_every_day_with_noisy_topics(fresh_database):
    spec = WorldSpec(users=1000, experts=20, seed=4, new_users_per_day=0.05)
    with psycopg.connect(fresh_database) as conn:
        counts = _seed_and_play(conn, spec, 2)
        new = conn.execute(
            "select (u.signed_up_at at time zone 'UTC')::date, u.signup_topics, t.interests"
            " from app.users u join world.user_truth t using (user_id)"
            " where u.signed_up_at >= '2026-01-01'").fetchall()

    assert all(c["new_users"] > 20 for c in counts)
    assert len(new) == sum(c["new_users"] for c in counts)
    assert {d for d, _, _ in new} == {date(2026, 1, 1), date(2026, 1, 2)}
    assert all(1 <= len(topics) <= 3 for _, topics, _ in new)
    # Sign-up topics are noisy but informative: a ticked topic holds on average over twice
    # the interest of a topic drawn at random (1/12 of it, 1.0 on this scale).
    held = [sum(interests[t] for t in topics) / len(topics) * 12 for _, topics, interests in new]
    assert sum(held) / len(held) > 2.0


def test_good_sessions_extend_budgets_and_poor_ones_shorten_them(fresh_database):
    outcome = {}
    for quality in (2.0, -2.0):
        with psycopg.connect(fresh_database) as conn:
            conn.execute(WORLD_SCHEMA_SQL)
            for table in ("world.interest_jumps", "world.days", "world.user_truth",
                          "world.expert_truth", "world.settings", *reversed(TABLES),
                          "app.experts", "app.topics"):
                conn.execute(f"delete from {table}")
            seed_world(conn, WorldSpec(users=800, experts=20, seed=2, new_users_per_day=0))
            conn.execute("update world.expert_truth set quality = %s", (quality,))
            start = conn.execute("select sum(budget), sum(activity)"
                                 " from world.user_truth").fetchone()
            counts = [simulate_day(conn, date(2026, 1, 1 + d)) for d in range(4)]
            end = conn.execute("select sum(budget), sum(activity),"
                               " count(*) filter (where churned_on is not null)"
                               " from world.user_truth").fetchone()
            reviews = conn.execute("select avg(rating) from app.reviews").fetchone()[0]
            conn.commit()
        outcome[quality] = {"budget": end[0] - start[0], "activity": end[1] - start[1],
                            "churned": end[2], "rating": float(reviews),
                            "bookings": sum(c["bookings"] for c in counts)}

    good, poor = outcome[2.0], outcome[-2.0]
    assert good["bookings"] > 0 and poor["bookings"] > 0
    assert good["rating"] > 4.0 > 2.5 > poor["rating"]
    assert good["budget"] > poor["budget"]
    assert good["activity"] > poor["activity"]
    assert good["churned"] <= poor["churned"]


def test_churned_users_stop_visiting(fresh_database):
    with psycopg.connect(fresh_database) as conn:
        seed_world(conn, WorldSpec(users=300, experts=10, seed=9, new_users_per_day=0))
        conn.execute("update world.user_truth set budget = 0.5, activity = 0.9"
                     " where user_id <= 100")
        first = simulate_day(conn, date(2026, 1, 1))
        churned = {r[0] for r in conn.execute(
            "select user_id from world.user_truth where churned_on = '2026-01-01'")}
        simulate_day(conn, date(2026, 1, 2))
        came_back = conn.execute(
            "select count(distinct user_id) from app.impressions"
            " where shown_at >= '2026-01-02' and user_id = any(%s)",
            (list(churned),)).fetchone()[0]
    # A good booking can still rescue a few of them.
    assert len(churned & set(range(1, 101))) >= 80
    assert first["churned"] == len(churned)
    assert first["active_users"] == 300 - len(churned)
    assert came_back == 0
