"""The reporting DAG's summary of one date's published lists, checked by hand."""

from __future__ import annotations

from datetime import date

import psycopg
import pytest

from rec.reporting import daily_summary, latest_run_date
from rec.world.generate import WorldSpec, seed_world

RUN_DATE = date(2026, 1, 2)


def _publish(conn, rows: list[tuple]) -> None:
    partitioned = conn.execute(
        "select relkind = 'p' from pg_class where oid = 'rec.recommendations'::regclass"
    ).fetchone()[0]
    if partitioned:
        conn.execute(
            "create table rec.recommendations_test partition of rec.recommendations"
            " for values from ('2026-01-02') to ('2026-01-03')")
    conn.cursor().executemany(
        "insert into rec.recommendations (run_date, user_id, rank, service_id, expert_id,"
        " score, propensity, model_version, generated_at)"
        " values (%s, %s, %s, %s, %s, %s, 1, %s, now())", rows)


def test_summary_of_a_published_date(fresh_database):
    with psycopg.connect(fresh_database) as conn:
        assert latest_run_date(fresh_database) is None
        seed_world(conn, WorldSpec(users=10, experts=3, seed=1))
        services = conn.execute(
            "select service_id, expert_id from app.services where is_active"
            " order by service_id limit 3").fetchall()
        active = conn.execute("select count(*) from app.services where is_active").fetchone()[0]
        (s1, e1), (s2, e2), (s3, e3) = services
        _publish(conn, [
            (RUN_DATE, 1, 1, s1, e1, 0.9, "v1"), (RUN_DATE, 1, 2, s2, e2, 0.5, "v1"),
            (RUN_DATE, 2, 1, s1, e1, 0.8, "v1"), (RUN_DATE, 2, 2, s3, e3, 0.2, "v1"),
            (RUN_DATE, 3, 1, s2, e2, 0.6, "v1"),
        ])
        conn.commit()

    assert latest_run_date(fresh_database) == RUN_DATE
    summary = daily_summary(RUN_DATE, fresh_database)
    assert summary == {
        "run_date": "2026-01-02",
        "users": 3,
        "rows": 5,
        "services": 3,
        "experts": len({e1, e2, e3}),
        "catalogue_coverage": pytest.approx(round(3 / active, 4)),
        "mean_score": pytest.approx(0.6, abs=1e-4),
        "top1_share": pytest.approx(round(2 / 3, 4)),
        "model_versions": ["v1"],
    }
    assert daily_summary(date(2026, 1, 9), fresh_database)["users"] == 0
