"""Every DAG file parses without import errors, cheaply, and wires the stages in order."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from rec.config import REPO_ROOT
from rec.dbt_graph import load_models

# Modules a DAG file must not import at parse time: the DAG processor parses every file
# every few seconds, and each of these takes from a tenth of a second to several seconds.
HEAVY_MODULES = ["torch", "pandas", "numpy", "dbt", "great_expectations", "cosmos", "psycopg",
                 "data_checks"]


@pytest.fixture(scope="module")
def bag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(REPO_ROOT / "dags"))


def _upstream(dag, task_id: str) -> set[str]:
    return dag.get_task(task_id).upstream_task_ids


def test_dagbag_has_no_import_errors(bag):
    assert bag.import_errors == {}
    assert {"rec_nightly", "rec_reporting", "world_traffic"} <= set(bag.dags)
    for dag in bag.dags.values():
        assert dag.doc_md and dag.tags, f"{dag.dag_id} needs doc_md and tags for the UI"
        for task in dag.tasks:
            callable_doc = getattr(getattr(task, "python_callable", None), "__doc__", None)
            doc = task.doc_md or task.doc or callable_doc
            assert doc, f"{task.task_id} of {dag.dag_id} has no doc"


def test_stages_run_in_order(bag):
    dag = bag.dags["rec_nightly"]
    assert "migrate" in _upstream(dag, "extract")
    assert _upstream(dag, "dbt.source_freshness") == {"extract"}
    assert _upstream(dag, "validate_features") == {"dbt.docs_generate"}
    assert "validate_features" in _upstream(dag, "fit_choice_model")
    assert "fit_choice_model" in _upstream(dag, "train_agent")
    assert set(dag.params) >= {"top_n", "exploration", "agent_steps", "history_days"}


def test_each_dbt_model_is_a_task_with_its_tests_after_it(bag):
    dag = bag.dags["rec_nightly"]
    models = load_models(REPO_ROOT / "dbt_project")
    assert len(models) == len(list((REPO_ROOT / "dbt_project/models").rglob("*.sql")))

    for name, model in models.items():
        run, test = dag.get_task(f"dbt.{name}.run"), dag.get_task(f"dbt.{name}.test")
        assert run.task_id in test.upstream_task_ids
        assert test.task_id in _upstream(dag, "dbt.docs_generate")
        # A model waits for the tests of every model it reads; staging waits for freshness.
        expected = {f"dbt.{parent}.test" for parent in model.refs} or {"dbt.source_freshness"}
        assert run.upstream_task_ids == expected
        # Its tests wait for every model they read (relationships tests read two).
        for other in model.test_refs:
            assert f"dbt.{other}.run" in test.upstream_task_ids
        assert run.retries >= 1 and run.retry_exponential_backoff
        assert test.retries == 0, "a failed data test is a finding, not a glitch"

    impressions_test = dag.get_task("dbt.stg_app__impressions.test")
    assert "dbt.stg_app__users.run" in impressions_test.upstream_task_ids


def test_db_bound_tasks_retry_with_backoff(bag):
    dag = bag.dags["rec_nightly"]
    for task_id in ("migrate", "extract", "dbt.stg_app__users.run", "dbt.docs_generate"):
        task = dag.get_task(task_id)
        assert task.retries >= 1 and task.retry_exponential_backoff, task_id
        assert task.max_retry_delay is not None, task_id
    assert dag.get_task("dbt.source_freshness").retries == 0, "stale data is not a glitch"


def test_recommendations_asset_drives_the_reporting_dag(bag):
    from rec.assets import RECOMMENDATIONS

    nightly = bag.dags["rec_nightly"]
    producers = [t.task_id for t in nightly.tasks if RECOMMENDATIONS in (t.outlets or [])]
    assert producers, "some rec_nightly task must declare the recommendations asset"
    reporting = bag.dags["rec_reporting"]
    assert RECOMMENDATIONS in reporting.timetable.asset_condition.objects


def test_dag_files_do_not_import_heavy_modules():
    """The structural half of 'parses in under a second' (bench/dag_parse.py times it)."""
    script = (
        "import json, runpy, sys\n"
        "import airflow.sdk\n"
        "before = set(sys.modules)\n"
        f"for path in {sorted(str(p) for p in (REPO_ROOT / 'dags').glob('*.py'))!r}:\n"
        "    runpy.run_path(path)\n"
        "print(json.dumps(sorted(set(sys.modules) - before)))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=REPO_ROOT, check=True)
    imported = json.loads(result.stdout.strip().splitlines()[-1])
    heavy = [m for m in imported if m.split(".")[0] in HEAVY_MODULES]
    assert heavy == []


def test_param_defaults_follow_the_environment():
    import json
    import os
    import subprocess
    import sys

    script = (
        "import json; from airflow.dag_processing.dagbag import DagBag;"
        "p = DagBag(dag_folder='dags').dags['rec_nightly'].params;"
        "print(json.dumps({k: p[k] for k in ('top_n', 'exploration', 'users_per_shard')}))"
    )
    env = {**os.environ, "REC_TOP_N": "7", "REC_EXPLORATION": "0.25",
           "REC_USERS_PER_SHARD": "5000"}
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=env, check=True,
                         capture_output=True, text=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == {
        "top_n": 7, "exploration": 0.25, "users_per_shard": 5000}
