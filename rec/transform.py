"""Builds the analytics schema for one nightly run by invoking dbt in-process.

The dbt project lives in `dbt_project/`; its connection comes from the pipeline's
database URL through `REC_PG_*` variables, and its target/ and logs/ go under
`REC_HOME/dbt` so that the repository stays clean.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import time

from rec.config import REPO_ROOT, rec_home
from rec.db import database_url, url_parts

log = logging.getLogger(__name__)

DBT_PROJECT_DIR = REPO_ROOT / "dbt_project"
FAILED_STATUSES = {"error", "fail", "runtime error"}


def _set_connection_env(url: str) -> None:
    """Expose the URL's parts under the names profiles.yml reads."""
    parts = url_parts(url)
    for part in ("host", "port", "user", "password", "dbname"):
        os.environ[f"REC_PG_{part.upper()}"] = parts[part]


def _dbt_args(command: str, run_date: datetime.date, history_days: int) -> list[str]:
    dbt_home = rec_home() / "dbt"
    variables = {"run_date": run_date.isoformat(), "history_days": history_days}
    return [
        "--log-level",
        "warn",
        "--no-use-colors",
        "--no-send-anonymous-usage-stats",
        "--no-version-check",
        "--log-path",
        str(dbt_home / "logs"),
        command,
        "--project-dir",
        str(DBT_PROJECT_DIR),
        "--profiles-dir",
        str(DBT_PROJECT_DIR),
        "--target-path",
        str(dbt_home / "target"),
        "--vars",
        json.dumps(variables),
    ]


def run_dbt(
    run_date: datetime.date,
    url: str | None = None,
    command: str = "build",
    history_days: int = 28,
) -> dict:
    """Run a dbt command (`build` by default) for the nightly run serving `run_date`.

    Args:
        run_date: The logical date D; only events before D are read.
        url: Database URL; the pipeline's database when None.
        command: The dbt command to run (build, run, test, compile, ...).
        history_days: Days of logged slates in `choice_training_slates`.

    Returns:
        A summary: command, run_date, nodes (count), passed, failed, skipped, seconds.

    Raises:
        RuntimeError: dbt failed; the message names each failing node and its error.
    """
    from dbt.cli.main import dbtRunner

    _set_connection_env(url or database_url())
    args = _dbt_args(command, run_date, history_days)

    started = time.perf_counter()
    outcome = dbtRunner().invoke(args)
    seconds = time.perf_counter() - started

    results = list(getattr(outcome.result, "results", None) or [])
    statuses = [str(result.status).lower() for result in results]
    failed = [r for r, s in zip(results, statuses, strict=True) if s in FAILED_STATUSES]
    summary = {
        "command": command,
        "run_date": run_date.isoformat(),
        "nodes": len(results),
        "passed": sum(s in {"success", "pass"} for s in statuses),
        "failed": len(failed),
        "skipped": sum(s == "skipped" for s in statuses),
        "warned": sum(s == "warn" for s in statuses),
        "seconds": round(seconds, 2),
    }

    if not outcome.success:
        lines = [f"{r.node.unique_id} ({r.status}): {r.message}" for r in failed]
        if outcome.exception is not None:
            lines.append(f"{type(outcome.exception).__name__}: {outcome.exception}")
        detail = "\n  ".join(lines) or "no node reported an error"
        raise RuntimeError(
            f"dbt {command} for {run_date} failed ({summary['failed']} failed, "
            f"{summary['skipped']} skipped):\n  {detail}"
        )

    log.info(
        "dbt %s for %s: %d nodes, %d passed, %d warned in %.1fs",
        command,
        run_date,
        summary["nodes"],
        summary["passed"],
        summary["warned"],
        seconds,
    )
    return summary
