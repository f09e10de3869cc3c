"""Nightly recommendations: extract the day's app events, build features, validate them,
refit the user choice model, retrain the RL agent in the simulator built from it, and
publish every user's top-N list.

The run with logical date D processes the events of day D-1 (its data interval) and
publishes the lists served on day D.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import CronTriggerTimetable, Param, dag, task

from rec.assets import RECOMMENDATIONS
from rec.config import RunConfig
from rec.dbt_tasks import dbt_task_group

# Database-bound tasks retry with a doubling delay (30 s, 60 s), capped at ten minutes.
DB_RETRIES = {"retries": 2, "retry_delay": timedelta(seconds=30), "retry_exponential_backoff": True,
              "max_retry_delay": timedelta(minutes=10)}


# The params' defaults come from the environment (REC_TOP_N, ...), read when the file is parsed.
DEFAULTS = RunConfig.from_env()


def _run_date(context) -> str:
    # The end of the data interval, not the logical date: `dags test` and the scheduler stamp
    # a run with its trigger time (D), but a backfill's runs carry the interval's start (D-1).
    return context["data_interval_end"].date().isoformat()


@dag(
    dag_id="rec_nightly",
    schedule=CronTriggerTimetable("0 0 * * *", timezone="UTC", interval=timedelta(days=1)),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["recommendations", "rl"],
    doc_md=__doc__,
    params={
        "top_n": Param(DEFAULTS.top_n, type="integer", minimum=1,
                       description="services per user list"),
        "exploration": Param(DEFAULTS.exploration, type="number", minimum=0, maximum=1,
                             description="share of slots sampled from the policy"),
        "agent_steps": Param(DEFAULTS.agent_steps, type="integer", minimum=1,
                             description="REINFORCE updates this night"),
        "history_days": Param(DEFAULTS.history_days, type="integer", minimum=1, maximum=365,
                              description="days of logged slates the models learn from"),
        "users_per_shard": Param(DEFAULTS.users_per_shard, type="integer", minimum=1_000,
                                 description="users scored by one mapped score_shard task"),
        "arm": Param(DEFAULTS.arm, type="string", enum=["rl", "myopic", "popularity"],
                     description="what to publish: the RL agent, or a control arm that skips"
                                 " agent training (myopic choice-model or popularity ranking)"),
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

    # Publishing: user shards are scored in parallel by mapped tasks (one per shard, on any
    # executor), each COPYing into the run's staging table; swap_in makes the date visible.
    @task(**DB_RETRIES)
    def plan_shards(**context) -> list[dict]:
        """Create the run's empty staging table and split the users into id ranges."""
        from datetime import date

        from rec.config import RunConfig
        from rec.publish import plan_shards as plan

        config = RunConfig.from_env(**context["params"])
        return plan(date.fromisoformat(_run_date(context)), context["run_id"],
                    config.users_per_shard)

    @task(**DB_RETRIES)
    def score_shard(shard: dict, **context) -> dict:
        """Score one shard's users and COPY their top-N lists into the staging table."""
        from datetime import date

        from rec.config import RunConfig
        from rec.publish import write_shard

        config = RunConfig.from_env(**context["params"])
        return write_shard(date.fromisoformat(_run_date(context)), context["run_id"], shard,
                           config)

    @task(outlets=[RECOMMENDATIONS], **DB_RETRIES)
    def swap_in(shards: list[dict], **context) -> dict:
        """Index the complete list and swap it in as the date's partition, in one transaction."""
        from datetime import date

        from rec.config import RunConfig
        from rec.publish import finish

        config = RunConfig.from_env(**context["params"])
        return finish(date.fromisoformat(_run_date(context)), context["run_id"], list(shards),
                      config)

    shards = plan_shards()
    swap_in(score_shard.expand(shard=shards))

    (migrate() >> extract() >> dbt_task_group() >> validate_features()
     >> fit_choice_model() >> train_agent() >> shards)


rec_nightly()
