"""The dbt project as Airflow tasks: one `run` and one `test` task per model.

Laid out like astronomer-cosmos's `DbtTaskGroup` (a group per model, its tests right
after it), but the graph comes from `rec.dbt_graph`, which reads the project's files,
so the DAG file parses without importing dbt or cosmos. Every task calls
`rec.transform.run_dbt` with the run's logical date as dbt's `run_date` var.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import TaskGroup, task

from rec.config import REPO_ROOT
from rec.dbt_graph import load_models, models_before_tests

DBT_PROJECT_DIR = REPO_ROOT / "dbt_project"

# Building a model talks to the database: retry it with a growing delay. A failed data
# test or a stale source is a finding, not a glitch, and is never retried.
BUILD_RETRIES = {
    "retries": 2,
    "retry_delay": timedelta(seconds=20),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=5),
}


FRESHNESS_FOLDER = "freshness"


def _dbt(context, command: str, select: str | None, folder: str) -> dict:
    """Run one dbt command for the run's logical date in a target folder of its own.

    The freshness check, first in every run, parses the project with this run's vars;
    each later task starts from a copy of that parse instead of parsing it again.
    """
    import shutil

    from rec.config import RunConfig
    from rec.transform import dbt_home, run_dbt

    target = dbt_home() / "target" / folder
    parsed = dbt_home() / "target" / FRESHNESS_FOLDER / "partial_parse.msgpack"
    if folder != FRESHNESS_FOLDER and parsed.exists():
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(parsed, target / parsed.name)

    history_days = context["params"].get("history_days") or RunConfig.history_days
    return run_dbt(
        context["data_interval_end"].date(),
        command=command,
        select=select,
        history_days=history_days,
        target_path=target,
    )


def _model_group(name: str, layer: str) -> tuple:
    """The group `<name>` with its `run` and `test` tasks; returns (run, test)."""
    with TaskGroup(group_id=name, tooltip=f"{layer} model {name}"):

        @task(task_id="run", doc_md=f"`dbt run --select {name}` ({layer} layer).",
              **BUILD_RETRIES)
        def run_model(**context) -> dict:
            return _dbt(context, "run", name, name)

        @task(task_id="test", doc_md=f"`dbt test --select {name}`: the model's data tests.")
        def test_model(**context) -> dict:
            return _dbt(context, "test", name, name)

        run, test = run_model(), test_model()
        run >> test
    return run, test


def dbt_task_group(group_id: str = "dbt") -> TaskGroup:
    """Source freshness, then every model's run and test in dependency order, then docs.

    A model runs once the models it reads have passed their tests; its tests run once
    every model they read (relationships tests read two) is built.
    """
    models = load_models(DBT_PROJECT_DIR)

    with TaskGroup(group_id=group_id, tooltip="dbt build, model by model") as group:

        @task(task_id="source_freshness")
        def source_freshness(**context) -> dict:
            """`dbt source freshness`: stop when the raw event tables were not loaded."""
            return _dbt(context, "source freshness", None, FRESHNESS_FOLDER)

        @task(task_id="docs_generate", **BUILD_RETRIES)
        def docs_generate(**context) -> str:
            """`dbt docs generate` into REC_HOME/dbt/docs: lineage and columns of this run."""
            from rec.transform import generate_docs

            return str(generate_docs(context["data_interval_end"].date()))

        freshness = source_freshness()
        docs = docs_generate()
        runs, tests = {}, {}
        for name, model in models.items():
            runs[name], tests[name] = _model_group(name, model.layer)

        for name, model in models.items():
            upstream = [tests[parent] for parent in sorted(model.refs)] or [freshness]
            upstream >> runs[name]
        for name, needs in models_before_tests(models).items():
            [runs[other] for other in sorted(needs - {name})] >> tests[name]
            tests[name] >> docs
    return group
