"""Nightly recommendations: extract the day's app events, build features, validate them,
refit the user choice model, retrain the RL agent in the simulator built from it, and
publish every user's top-N list.

The run with logical date D processes the events of day D-1 (its data interval) and
publishes the lists served on day D.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import Asset, CronTriggerTimetable, Param, dag, task

RECOMMENDATIONS = Asset(name="rec_recommendations", uri="rec://recommendations")

DB_RETRIES = {"retries": 2, "retry_delay": timedelta(seconds=30), "retry_exponential_backoff": True}


def _run_date(context) -> str:
    return context["logical_date"].date().isoformat()


@dag(
    dag_id="rec_nightly",
    schedule=CronTriggerTimetable("0 0 * * *", timezone="UTC", interval=timedelta(days=1)),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["recommendations", "rl"],
    doc_md=__doc__,
    params={
        "top_n": Param(20, type="integer", minimum=1, description="services per user list"),
        "exploration": Param(0.1, type="number", minimum=0, maximum=1,
                             description="share of slots sampled from the policy"),
        "agent_steps": Param(150, type="integer", minimum=1,
                             description="REINFORCE updates this night"),
    },
)
def rec_nightly():
    @task(**DB_RETRIES)
    def migrate() -> list[str]:
        """Apply any pending schema migrations."""
        from rec import db

        return db.migrate()

    @task(**DB_RETRIES)
    def extract(**context) -> dict:
        """Copy the data interval's app events into `raw`; quarantine rows that do not fit."""
        from rec.extract import extract_day

        return extract_day(context["data_interval_start"], context["data_interval_end"],
                           context["run_id"])

    @task(**DB_RETRIES)
    def build_features(**context) -> dict:
        """`dbt build`: staging, intermediate and mart models with their tests."""
        from datetime import date

        from rec.transform import run_dbt

        return run_dbt(date.fromisoformat(_run_date(context)))

    @task
    def validate_features(**context) -> dict:
        """Great Expectations suites on the marts; a failure stops the run here."""
        from datetime import date

        from data_checks.validate import validate_marts

        return validate_marts(date.fromisoformat(_run_date(context)))

    @task
    def fit_choice_model(**context) -> dict:
        """Refit the conditional-logit user choice model on the logged slates."""
        from datetime import date

        from rec.config import RunConfig
        from rec.train import fit_choice

        config = RunConfig.from_env(**context["params"])
        return fit_choice(date.fromisoformat(_run_date(context)), context["run_id"], config)

    @task
    def train_agent(**context) -> dict:
        """Retrain the REINFORCE agent in the simulator built from the fitted choice model."""
        from datetime import date

        from rec.config import RunConfig
        from rec.train import train_agent as train

        config = RunConfig.from_env(**context["params"])
        return train(date.fromisoformat(_run_date(context)), context["run_id"], config)

    @task(outlets=[RECOMMENDATIONS], **DB_RETRIES)
    def publish(**context) -> dict:
        """Write every user's top-N list for the run date in one transaction."""
        from datetime import date

        from rec.config import RunConfig
        from rec.publish import publish as publish_lists

        config = RunConfig.from_env(**context["params"])
        return publish_lists(date.fromisoformat(_run_date(context)), context["run_id"], config)

    (migrate() >> extract() >> build_features() >> validate_features()
     >> fit_choice_model() >> train_agent() >> publish())


rec_nightly()
