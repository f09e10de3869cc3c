"""Daily report on the published recommendations: runs whenever `rec_nightly` publishes.

Scheduled on the `rec_recommendations` Asset rather than a clock, so it reads each
date's lists right after they are swapped in. It logs reach (users with a list),
catalogue coverage, how concentrated the first slots are and the model versions, and
returns them as the task's XCom.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import dag, task

from rec.assets import RECOMMENDATIONS


@dag(
    dag_id="rec_reporting",
    schedule=[RECOMMENDATIONS],
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["recommendations", "reporting"],
    doc_md=__doc__,
)
def rec_reporting():
    @task(retries=2, retry_delay=timedelta(seconds=30), retry_exponential_backoff=True)
    def summarise_lists() -> dict:
        """Figures of the newest published lists (reach, coverage, concentration)."""
        from rec.reporting import daily_summary, latest_run_date

        # Limitation: it reports the newest published date; a backfill of an older date
        # triggers a report of the newest one, not of the date it wrote.
        run_date = latest_run_date()
        if run_date is None:
            return {}
        return daily_summary(run_date)

    summarise_lists()


rec_reporting()
