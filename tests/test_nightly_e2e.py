"""The whole nightly loop through Airflow on a tiny world: publish, rerun, and a GX stop."""

from __future__ import annotations

from datetime import date

import psycopg
import pytest

from rec.orchestrate import run_dag, run_log_path
from rec.world.generate import WorldSpec, seed_world
from rec.world.traffic import simulate_day

TOP_N = 20
FAST = {"agent_steps": 10, "top_n": TOP_N}


def _lists(conn, run_date: date) -> dict:
    row = conn.execute(
        "select count(*), count(distinct user_id), min(rank), max(rank),"
        " count(*) filter (where propensity <= 0 or propensity > 1)"
        " from rec.recommendations where run_date = %s", (run_date,)).fetchone()
    return dict(zip(("rows", "users", "min_rank", "max_rank", "bad_propensity"), row,
                    strict=True))


@pytest.mark.slow
def test_nightly_run_publishes_every_user_and_reruns_cleanly(fresh_database):
    with psycopg.connect(fresh_database) as conn:
        seed_world(conn, WorldSpec(users=150, experts=15, seed=5))
        simulate_day(conn, date(2026, 1, 1))
        conn.commit()

    run_dag("rec_nightly", date(2026, 1, 2), FAST)
    # `dags test` writes no task log files: run_dag keeps the run's output, task logs included.
    output = run_log_path("rec_nightly", date(2026, 1, 2)).read_text()
    assert "task_id=dbt.expert_features.test" in output and "task_id=swap_in" in output

    with psycopg.connect(fresh_database) as conn:
        expected_users = conn.execute(
            "select count(*) from app.users where signed_up_at < '2026-01-02'").fetchone()[0]
        cold_users = conn.execute(
            "select count(*) from app.users u where signed_up_at < '2026-01-02' and not exists"
            " (select 1 from app.events e where e.user_id = u.user_id)").fetchone()[0]
        per_user = conn.execute(
            "select count(*) from (select user_id from rec.recommendations"
            " where run_date = '2026-01-02' group by user_id"
            " having count(*) <> %s or count(distinct service_id) <> %s"
            " or count(distinct rank) <> %s) bad", (TOP_N, TOP_N, TOP_N)).fetchone()[0]
        first = _lists(conn, date(2026, 1, 2))
        stages = {r[0] for r in conn.execute(
            "select stage from rec.model_runs where run_date = '2026-01-02'")}

    assert cold_users > 0
    assert first == {"rows": expected_users * TOP_N, "users": expected_users, "min_rank": 1,
                     "max_rank": TOP_N, "bad_propensity": 0}
    assert per_user == 0
    assert stages == {"choice", "agent", "evaluate", "publish"}

    # Analysts read the lists and the marts dbt rebuilt, through their role.
    with psycopg.connect(fresh_database, autocommit=True) as conn:
        conn.execute("set role rec_analyst")
        assert conn.execute("select count(*) from analytics.user_features").fetchone()[0] > 0
        assert conn.execute("select count(*) from rec.recommendations").fetchone()[0] > 0

    run_dag("rec_nightly", date(2026, 1, 2), FAST)
    with psycopg.connect(fresh_database) as conn:
        assert _lists(conn, date(2026, 1, 2)) == first

        # The next day's traffic is served from the published lists.
        simulate_day(conn, date(2026, 1, 2))
        conn.commit()
        served = conn.execute(
            "select count(*) filter (where source like 'rec:%%'), count(*) from app.impressions"
            " where shown_at >= '2026-01-02'").fetchone()
    assert served[0] == served[1] > 0

    # A defect in a mart stops the run at validation: nothing is trained or published.
    with psycopg.connect(fresh_database) as conn:
        conn.execute("update analytics.user_interest_features set interest = 1.7"
                     " where user_id in (select user_id from analytics.user_interest_features"
                     " limit 3)")
        conn.commit()
    with pytest.raises(RuntimeError) as failure:
        run_dag("rec_nightly", date(2026, 1, 3), FAST, skip_tasks=r"dbt\..*")
    message = str(failure.value)
    assert "validate_features" in message
    assert "user_interest_features" in message and "interest" in message
    with psycopg.connect(fresh_database) as conn:
        assert _lists(conn, date(2026, 1, 3))["rows"] == 0
        assert conn.execute("select count(*) from rec.model_runs"
                            " where run_date = '2026-01-03'").fetchone()[0] == 0
        assert _lists(conn, date(2026, 1, 2)) == first
