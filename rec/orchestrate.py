"""Running the project's DAGs with Airflow, configured for this checkout.

Airflow's home, metadata database (SQLite) and logs live under REC_HOME; the DAGs
folder is the checkout's `dags/`. The same environment serves `rec nightly`,
`rec demo` and `rec airflow ...` (for example `rec airflow standalone`).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date, timedelta
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


def airflow_command(args: list[str], check: bool = True, capture: bool = False,
                    env: dict[str, str] | None = None):
    """Run `airflow ARGS` with the project's environment (plus `env`).

    Raises:
        RuntimeError: with `check`, the command failed; when its output was captured, the
            message carries the end of its stderr (and stdout), which would otherwise be lost.
    """
    executable = Path(sys.executable).parent / "airflow"
    result = subprocess.run([str(executable), *args], env=airflow_env() | (env or {}),
                            check=False, capture_output=capture, text=True)
    if check and result.returncode != 0:
        said = ""
        if capture:
            said = "\n" + "\n".join(
                part[-4000:] for part in (result.stderr, result.stdout) if part and part.strip())
        raise RuntimeError(f"airflow {' '.join(args[:3])} exited {result.returncode}{said}")
    return result


def ensure_metadata_db() -> None:
    """Create or upgrade Airflow's metadata database (a no-op when it is current)."""
    from importlib.metadata import version as installed_version

    marker = airflow_home() / ".migrated"
    # The installed distribution's version, read in this process: `airflow version` would
    # tell the same (the executable is this environment's) after a start-up of seconds.
    version = installed_version("apache-airflow")
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
    dag_file = REPO_ROOT / "dags" / f"{dag_id}.py"
    if dag_file.exists():
        # Parse (and write to the metadata DB) this DAG's file alone, not the whole folder.
        args += ["--dagfile-path", str(dag_file)]
    if conf:
        args += ["--conf", json.dumps(conf)]
    if skip_tasks:
        args += ["--mark-success-pattern", skip_tasks]
    result = airflow_command(args, check=False, capture=True)
    # `dags test` prints the task logs to its output and writes no task log files.
    output = run_log_path(dag_id, logical_date)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(result.stdout + result.stderr)
    state = dag_run_state(dag_id, logical_date)
    if result.returncode != 0 or state != "success":
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-60:])
        raise RuntimeError(
            f"{dag_id} for {logical_date} ended in state {state!r}; failed tasks: "
            f"{failed_tasks(dag_id, logical_date)}\n--- airflow output (tail) ---\n{tail}")
    log.info("%s for %s succeeded in %.1fs; its output: %s", dag_id, logical_date,
             time.perf_counter() - started, output)


def run_log_path(dag_id: str, logical_date: date) -> Path:
    """Where `run_dag` keeps the output (task logs included) of its last run of a date."""
    return airflow_home() / "dags-test-logs" / dag_id / f"{logical_date.isoformat()}.log"


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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def scheduler_stack(log_dir: Path | None = None) -> Iterator[dict[str, str]]:
    """Run Airflow's api-server, scheduler and dag-processor in the background, then stop them.

    What `airflow standalone` runs, minus the triggerer, on a free port, so that runs created
    outside `dags test` (a backfill) get executed. Cron schedules stay off
    (`use_job_schedule`): only runs created explicitly are executed, never a catch-up run
    of today's date.

    Yields:
        The extra environment the stack runs with, for Airflow commands sent to it.
    """
    ensure_metadata_db()
    port = _free_port()
    extra = {
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(16),
        "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
        # Task processes at once: the dbt staging models would otherwise all start together,
        # each a Python process of its own, which thrashes a small machine.
        "AIRFLOW__CORE__PARALLELISM": os.environ.get("AIRFLOW__CORE__PARALLELISM", "2"),
    }
    log_dir = log_dir or airflow_home() / "stack-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    executable = str(Path(sys.executable).parent / "airflow")
    processes = []
    try:
        for component in ("api-server", "dag-processor", "scheduler"):
            out = (log_dir / f"{component}.log").open("ab")
            processes.append(subprocess.Popen(
                [executable, component], env=airflow_env() | extra, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True))
        log.info("airflow api-server (port %d), dag-processor and scheduler started; logs in %s",
                 port, log_dir)
        yield extra
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        log.info("airflow stack stopped")


def run_backfill(dag_id: str, from_date: date, to_date: date, conf: dict | None = None,
                 timeout_s: float = 3600.0) -> dict[str, str]:
    """Backfill `dag_id` over from_date..to_date (inclusive) with `airflow backfill create`.

    A scheduler stack runs for the duration; the backfill runs one date at a time, in date
    order (each night warm-starts from the previous one). Dates that already have runs are
    run again (`--reprocess-behavior completed`).

    Returns:
        The state of the backfill's run of each logical date (ISO date -> state).

    Raises:
        RuntimeError: a run failed, or the runs did not finish within `timeout_s`.
    """
    expected = {(from_date + timedelta(days=i)).isoformat()
                for i in range((to_date - from_date).days + 1)}
    with scheduler_stack() as extra:
        _wait_for_dag(dag_id, timeout_s=300)
        airflow_command(["dags", "unpause", dag_id], capture=True, env=extra)
        args = ["backfill", "create", "--dag-id", dag_id, "--from-date", from_date.isoformat(),
                "--to-date", to_date.isoformat(), "--max-active-runs", "1",
                "--reprocess-behavior", "completed"]
        if conf:
            args += ["--dag-run-conf", json.dumps(conf)]
        started = time.perf_counter()
        airflow_command(args, capture=True, env=extra)
        states: dict[str, str] = {}
        while time.perf_counter() - started < timeout_s:
            states = _backfill_states(dag_id, expected)
            if len(states) == len(expected) and all(
                    s in ("success", "failed") for s in states.values()):
                break
            time.sleep(5)
        airflow_command(["dags", "pause", dag_id], capture=True, check=False, env=extra)
    failed = sorted(d for d, s in states.items() if s != "success")
    if len(states) < len(expected) or failed:
        raise RuntimeError(f"backfill of {dag_id} {from_date}..{to_date} did not succeed: "
                           f"{states or 'no runs were created'}")
    log.info("backfill of %s %s..%s: %d runs succeeded in %.0fs", dag_id, from_date, to_date,
             len(states), time.perf_counter() - started)
    return states


def _wait_for_dag(dag_id: str, timeout_s: float) -> None:
    """Wait until the dag-processor has parsed and serialised the DAG."""
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        try:
            if _metadata_query("select 1 from serialized_dag where dag_id = :dag_id",
                               {"dag_id": dag_id}):
                return
        except Exception:  # noqa: BLE001 - the table may be locked while the processor writes
            pass
        time.sleep(2)
    raise RuntimeError(f"the dag-processor did not serialise {dag_id} within {timeout_s:.0f}s")


def _backfill_states(dag_id: str, expected: set[str]) -> dict[str, str]:
    # Keyed by the end of the data interval: a backfill's runs carry the interval's start
    # as their logical date, where `dags test` and scheduled runs carry its end.
    rows = _metadata_query(
        "select data_interval_end, state from dag_run where dag_id = :dag_id"
        " and run_type = 'backfill' order by id", {"dag_id": dag_id})
    latest = {str(r[0])[:10]: r[1] for r in rows}
    return {d: s for d, s in latest.items() if d in expected}
