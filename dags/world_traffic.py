"""The simulated world's traffic: plays one day of app usage against the published lists.

For demos and evaluation only: in production the app itself writes these events. The run
with logical date D plays day D-1 (its data interval), so that `rec_nightly` for D finds it.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import CronTriggerTimetable, dag, task


@dag(
    dag_id="world_traffic",
    schedule=CronTriggerTimetable("0 0 * * *", timezone="UTC", interval=timedelta(days=1)),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["simulation"],
    doc_md=__doc__,
)
def world_traffic():
    @task(retries=0)
    def play_day(**context) -> dict:
        """Simulate the interval's day: visits, slates, clicks, bookings, likes, reviews."""
        from rec import db
        from rec.world.traffic import simulate_day

        with db.transaction() as conn:
            return simulate_day(conn, context["data_interval_start"].date())

    play_day()


world_traffic()
