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
from collections.abc import Sequence
from pathlib import Path

import yaml

from rec.config import REPO_ROOT, rec_home
from rec.db import database_url, url_parts

log = logging.getLogger(__name__)

DBT_PROJECT_DIR = REPO_ROOT / "dbt_project"
FAILED_STATUSES = {"error", "fail", "runtime error"}


class DbtFailure(RuntimeError):
    """A dbt command failed.

    `data_tests_failed` names the data tests that found bad rows (empty when the failure
    was an error, such as a model that could not be built); `skipped` names the nodes dbt
    did not run because something they depend on failed.
    """

    def __init__(self, message: str, data_tests_failed: list[str], skipped: list[str]):
        super().__init__(message)
        self.data_tests_failed = data_tests_failed
        self.skipped = skipped


def set_connection_env(url: str) -> None:
    """Expose the URL's parts under the names profiles.yml reads."""
    parts = url_parts(url)
    for part in ("host", "port", "user", "password", "dbname"):
        os.environ[f"REC_PG_{part.upper()}"] = parts[part]


def dbt_home() -> Path:
    """Where dbt's target folders, logs and the generated docs live."""
    return rec_home() / "dbt"


def docs_dir() -> Path:
    """The static dbt docs site (index.html, manifest.json, catalog.json)."""
    return dbt_home() / "docs"


def _dbt_args(
    command: str,
    run_date: datetime.date,
    history_days: int,
    select: str | None,
    target_path: Path,
    extra: Sequence[str],
) -> list[str]:
    variables = {"run_date": run_date.isoformat(), "history_days": history_days}
    selection = ["--select", select] if select else []
    return [
        "--log-level",
        "warn",
        "--no-use-colors",
        "--no-send-anonymous-usage-stats",
        "--no-version-check",
        "--log-path",
        str(dbt_home() / "logs"),
        *command.split(),
        "--project-dir",
        str(DBT_PROJECT_DIR),
        "--profiles-dir",
        str(DBT_PROJECT_DIR),
        "--target-path",
        str(target_path),
        "--vars",
        json.dumps(variables),
        *selection,
        *extra,
    ]


def dbt_variable(name: str) -> object:
    """A variable's default in the dbt project (`vars:` of dbt_project.yml)."""
    with (DBT_PROJECT_DIR / "dbt_project.yml").open() as project:
        return yaml.safe_load(project)["vars"][name]


def run_dbt(
    run_date: datetime.date,
    url: str | None = None,
    command: str = "build",
    history_days: int = 28,
    select: str | None = None,
    target_path: Path | None = None,
    extra: Sequence[str] = (),
) -> dict:
    """Run a dbt command (`build` by default) for the nightly run serving `run_date`.

    Args:
        run_date: The logical date D; only events before D are read.
        url: Database URL; the pipeline's database when None.
        command: The dbt command to run (build, run, test, source freshness, ...).
        history_days: Days of logged slates in `choice_training_slates`.
        select: A dbt node selection (`--select`); the whole project when None.
        target_path: dbt's target folder; `REC_HOME/dbt/target` when None. Commands that
            may run at the same time need folders of their own.
        extra: Further arguments of the command.

    Returns:
        A summary: command, run_date, nodes (count), passed, failed, skipped, seconds, and
        `models_s`, the seconds each model took to build (empty unless models ran).

    Raises:
        DbtFailure: dbt failed; the message names each failing node and its error.
    """
    from dbt.cli.main import dbtRunner

    set_connection_env(url or database_url())
    args = _dbt_args(command, run_date, history_days, select,
                     target_path or dbt_home() / "target", extra)

    started = time.perf_counter()
    outcome = dbtRunner().invoke(args)
    seconds = time.perf_counter() - started

    results = list(getattr(outcome.result, "results", None) or [])
    statuses = [str(result.status).lower() for result in results]
    failed = [r for r, s in zip(results, statuses, strict=True) if s in FAILED_STATUSES]
    summary = {
        "command": command,
        "select": select,
        "run_date": run_date.isoformat(),
        "nodes": len(results),
        "passed": sum(s in {"success", "pass"} for s in statuses),
        "failed": len(failed),
        "skipped": sum(s == "skipped" for s in statuses),
        "warned": sum(s == "warn" for s in statuses),
        "seconds": round(seconds, 2),
        "models_s": {r.node.name: round(float(r.execution_time or 0.0), 2)
                     for r in results if getattr(r.node, "resource_type", None) == "model"},
    }

    if not outcome.success:
        lines = [f"{r.node.unique_id} ({r.status}): {r.message}" for r in failed]
        if outcome.exception is not None:
            lines.append(f"{type(outcome.exception).__name__}: {outcome.exception}")
        detail = "\n  ".join(lines) or "no node reported an error"
        selected = f" --select {select}" if select else ""
        raise DbtFailure(
            f"dbt {command}{selected} for {run_date} failed ({summary['failed']} failed, "
            f"{summary['skipped']} skipped):\n  {detail}",
            [r.node.unique_id for r, s in zip(results, statuses, strict=True)
             if s == "fail" and getattr(r.node, "resource_type", None) == "test"],
            [r.node.unique_id for r, s in zip(results, statuses, strict=True) if s == "skipped"],
        )

    log.info(
        "dbt %s %s for %s: %d nodes, %d passed, %d warned in %.1fs",
        command,
        select or "(all)",
        run_date,
        summary["nodes"],
        summary["passed"],
        summary["warned"],
        seconds,
    )
    return summary


def generate_docs(run_date: datetime.date, url: str | None = None,
                  history_days: int = 28) -> Path:
    """`dbt docs generate` into `docs_dir()`: a static site to open or serve.

    The catalog reads the built relations' columns and types from the database, so
    this runs after the models are built.

    Returns:
        The site's index.html.
    """
    site = docs_dir()
    run_dbt(run_date, url, command="docs generate", history_days=history_days,
            target_path=site)
    index = site / "index.html"
    if not index.exists() or not (site / "catalog.json").exists():
        raise RuntimeError(f"dbt docs generate left no site in {site}")
    log.info("dbt docs for %s written to %s", run_date, index)
    return index
