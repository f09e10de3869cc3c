"""Running the project's DAGs with Airflow, configured for this checkout.

Airflow's home, metadata database (SQLite) and logs live under REC_HOME; the DAGs
folder is the checkout's `dags/`. The same environment serves `rec nightly`,
`rec demo` and `rec airflow ...` (for example `rec airflow standalone`).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from rec.config import REPO_ROOT, airflow_home
from rec.db import database_url

log = logging.getLogger(__name__)


def airflow_env() -> dict[str, str]:
    """The environment Airflow commands run with."""
    home = airflow_home()
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO_ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
        "REC_DATABASE_URL": database_url(),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])),
    })
    return env


def airflow_command(args: list[str], check: bool = True, capture: bool = False):
    """Run `airflow ARGS` with the project's environment."""
    executable = Path(sys.executable).parent / "airflow"
    return subprocess.run([str(executable), *args], env=airflow_env(), check=check,
                          capture_output=capture, text=True)


def ensure_metadata_db() -> None:
    """Create or upgrade Airflow's metadata database (a no-op when it is current)."""
    marker = airflow_home() / ".migrated"
    version = airflow_command(["version"], capture=True).stdout.strip()
    if marker.exists() and marker.read_text() == version:
        return
    started = time.perf_counter()
    airflow_command(["db", "migrate"], capture=True)
    marker.write_text(version)
    log.info("airflow metadata database ready in %.1fs", time.perf_counter() - started)


def run_dag(
    dag_id: str, logical_date: date, conf: dict | None = None, skip_tasks: str | None = None
) -> None:
    """Run one DAG run to completion on this machine (`airflow dags test`).

    Args:
        dag_id: the DAG.
        logical_date: the run's logical date.
        conf: run parameters (the DAG's params).
        skip_tasks: a regex of task ids to mark successful without running them.

    Raises:
        RuntimeError: the run did not succeed; the message names the failed tasks.
    """
    ensure_metadata_db()
    started = time.perf_counter()
    args = ["dags", "test", dag_id, logical_date.isoformat()]
    if conf:
        args += ["--conf", json.dumps(conf)]
    if skip_tasks:
        args += ["--mark-success-pattern", skip_tasks]
    result = airflow_command(args, check=False, capture=True)
    state = dag_run_state(dag_id, logical_date)
    if result.returncode != 0 or state != "success":
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-60:])
        raise RuntimeError(
            f"{dag_id} for {logical_date} ended in state {state!r}; failed tasks: "
            f"{failed_tasks(dag_id, logical_date)}\n--- airflow output (tail) ---\n{tail}")
    log.info("%s for %s succeeded in %.1fs", dag_id, logical_date, time.perf_counter() - started)


def _metadata_query(sql: str, params: dict) -> list[tuple]:
    """Read Airflow's metadata database: SQLite under AIRFLOW_HOME unless configured."""
    import sqlalchemy

    url = os.environ.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN") or (
        f"sqlite:///{airflow_home() / 'airflow.db'}")
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(sqlalchemy.text(sql), params)]
    finally:
        engine.dispose()


def dag_run_state(dag_id: str, logical_date: date) -> str | None:
    rows = _metadata_query(
        "select state, logical_date from dag_run where dag_id = :dag_id order by id desc",
        {"dag_id": dag_id})
    rows = [r for r in rows if str(r[1]).startswith(logical_date.isoformat())]
    return rows[0][0] if rows else None


def failed_tasks(dag_id: str, logical_date: date) -> list[str]:
    rows = _metadata_query(
        "select ti.task_id, ti.state, r.logical_date from task_instance ti join dag_run r"
        " on r.run_id = ti.run_id and r.dag_id = ti.dag_id where ti.dag_id = :dag_id"
        " and ti.state in ('failed', 'upstream_failed')", {"dag_id": dag_id})
    return [f"{r[0]} ({r[1]})" for r in rows if str(r[2]).startswith(logical_date.isoformat())]
