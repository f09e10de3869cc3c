"""Validates the marts of one nightly run with Great Expectations before any model reads them.

`validate_marts` runs every suite of `data_checks.suites` against the analytics
schema, renders the results into GX Data Docs under `REC_HOME/gx/data_docs`, records
each mart's row count and outcome in `rec.data_check_runs` (the baseline the next
night's row-count collapse check compares with), and raises `DataCheckError`, which
stops the nightly run, when one fails.
"""

from __future__ import annotations

import datetime
import logging
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from rec.config import rec_home
from rec.db import connect, database_url, url_parts
from rec.transform import dbt_variable

if TYPE_CHECKING:
    from data_checks.suites import RunFacts

log = logging.getLogger(__name__)

ANALYTICS_SCHEMA = "analytics"
DATASOURCE_NAME = "rec_analytics"
DOCS_SITE = "rec_data_docs"


def data_docs_dir() -> Path:
    """GX Data Docs of every validation: open index.html in a browser."""
    return rec_home() / "gx" / "data_docs"


def _context_config():
    """An in-memory GX context, except validation results and Data Docs, kept on disk.

    Suites, sources and checkpoints are rebuilt from code on every run, so only what
    the Data Docs index lists, each run's results, needs to outlive the process.
    """
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
    )

    def on_disk(folder: Path) -> dict:
        return {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(folder)}

    # Limitation: results and their pages accumulate, one set per validation; nothing
    # prunes them (a few hundred kilobytes a night).
    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False)
    )
    config.stores[config.validation_results_store_name] = {
        "class_name": "ValidationResultsStore",
        "store_backend": on_disk(rec_home() / "gx" / "validations"),
    }
    config.data_docs_sites = {
        DOCS_SITE: {
            "class_name": "SiteBuilder",
            "store_backend": on_disk(data_docs_dir()),
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        }
    }
    return config


class DataCheckError(RuntimeError):
    """A mart failed its expectation suite; the message names every failure."""


def sqlalchemy_url(url: str, schema: str | None = None) -> str:
    """The database URL in SQLAlchemy's form (psycopg 3 driver), socket folders included.

    With `schema`, sessions resolve unqualified table names in that schema first.
    """
    from sqlalchemy.engine import URL

    parts = url_parts(url)
    on_socket = parts["host"].startswith("/")
    query = {"host": parts["host"]} if on_socket else {}
    if schema:
        query["options"] = f"-csearch_path={schema}"
    return URL.create(
        drivername="postgresql+psycopg",
        username=parts["user"],
        password=parts["password"] or None,
        host=None if on_socket else parts["host"],
        port=int(parts["port"]),
        database=parts["dbname"],
        query=query,
    ).render_as_string(hide_password=False)


def _run_facts(url: str, run_date: datetime.date) -> RunFacts:
    from data_checks.suites import RunFacts

    with connect(url) as conn:
        users = conn.execute(
            "select count(*) from raw.users where signed_up_at < %s", (run_date,)
        ).fetchone()[0]
        services = conn.execute("select count(*) from raw.services").fetchone()[0]
        # Only earlier nights count: a rerun of the same night must not be judged by its
        # own first attempt, and a failed validation never becomes the baseline.
        previous = conn.execute(
            "select distinct on (suite) suite, run_date, row_count from rec.data_check_runs"
            " where success and row_count is not null and run_date < %s"
            " order by suite, run_date desc, checked_at desc",
            (run_date,),
        ).fetchall()
    return RunFacts(
        run_date=run_date,
        users_signed_up=users,
        services=services,
        previous_row_counts={suite: (day, count) for suite, day, count in previous},
        signup_prior_weight=float(dbt_variable("signup_prior_weight")),
    )


def _observed_row_count(results) -> int | None:
    """The table row count GX observed while validating one suite, if it checked one."""
    for result in results:
        if result.expectation_config.type == "expect_table_row_count_to_be_between":
            observed = (result.result or {}).get("observed_value")
            if isinstance(observed, int):
                return observed
    return None


def _record_run(url: str, run_date: datetime.date, summary: dict[str, dict]) -> None:
    """Append each mart's row count and outcome to rec.data_check_runs."""
    with connect(url) as conn:
        with conn.cursor() as cursor:
            cursor.executemany(
                "insert into rec.data_check_runs (run_date, suite, row_count, success)"
                " values (%s, %s, %s, %s)",
                [(run_date, name, s["row_count"], s["success"]) for name, s in summary.items()],
            )
        conn.commit()


def _describe_failure(result) -> str:
    """One line: expectation type, its column(s) and what was observed."""
    config = result.expectation_config
    kwargs = config.kwargs
    target = kwargs.get("column") or kwargs.get("column_list") or kwargs.get("column_set")
    details = result.result or {}
    if result.exception_info and result.exception_info.get("raised_exception"):
        observed = f"raised {result.exception_info.get('exception_message')}"
    elif "unexpected_count" in details:
        observed = (
            f"{details['unexpected_count']} unexpected of {details.get('element_count')},"
            f" e.g. {details.get('partial_unexpected_list', [])[:5]}"
        )
    else:
        value = details.get("observed_value")
        shown = str(value) if isinstance(value, (str, datetime.date)) else repr(value)
        observed = f"observed {shown}"
    bounds = {k: kwargs[k] for k in ("min_value", "max_value", "value") if k in kwargs}
    label = config.description or ", ".join(f"{k}={v}" for k, v in bounds.items())
    column = f" column={target}" if target else ""
    return f"{config.type}{column} ({label}): {observed}"


def validate_marts(run_date: datetime.date, url: str | None = None) -> dict:
    """Run every mart's suite against the analytics schema of the database.

    Args:
        run_date: The logical date D the marts were built for.
        url: Database URL; the pipeline's database when None.

    Returns:
        {suite_name: {"success": bool, "evaluated": n, "failed": [descriptions],
        "row_count": rows GX counted, None when the table could not be read}}.

    Raises:
        DataCheckError: a suite failed; the message names each suite and expectation.
    """
    import great_expectations as gx
    from great_expectations.checkpoint import UpdateDataDocsAction
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.base import ProgressBarsConfig
    from great_expectations.datasource.fluent.interfaces import (
        GxDatasourceWarning,
        TestConnectionError,
    )

    from data_checks.suites import build_suites

    # This GX module pins its own logger to INFO and announces every temporary folder.
    logging.getLogger("great_expectations.data_context.types.base").setLevel(logging.WARNING)
    url = url or database_url()
    started = time.perf_counter()

    context = gx.get_context(project_config=_context_config(), mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    with warnings.catch_warnings():
        # The generic SQL source is on purpose: the Postgres one rejects socket URLs.
        warnings.simplefilter("ignore", GxDatasourceWarning)
        source = context.data_sources.add_sql(
            name=DATASOURCE_NAME,
            connection_string=sqlalchemy_url(url, schema=ANALYTICS_SCHEMA),
            create_temp_table=False,
        )

    summary: dict[str, dict] = {}
    definitions = []
    for suite in build_suites(_run_facts(url, run_date)):
        try:
            asset = source.add_table_asset(name=suite.name, table_name=suite.name)
        except TestConnectionError as error:
            reason = str(error).splitlines()[0]
            summary[suite.name] = {
                "success": False,
                "evaluated": 0,
                "failed": [reason],
                "row_count": None,
            }
            log.error("GX suite %s: table cannot be read", suite.name)
            continue
        batch = asset.add_batch_definition_whole_table(f"{suite.name}_whole_table")
        definitions.append(
            context.validation_definitions.add(
                gx.ValidationDefinition(
                    name=f"{suite.name}_{run_date.isoformat()}",
                    data=batch,
                    suite=context.suites.add(suite),
                )
            )
        )

    if definitions:
        checkpoint = context.checkpoints.add(
            gx.Checkpoint(
                name=f"rec_marts_{run_date.isoformat()}",
                validation_definitions=definitions,
                actions=[UpdateDataDocsAction(name="data_docs", site_names=[DOCS_SITE])],
                result_format="SUMMARY",
            )
        )
        run_id = RunIdentifier(run_name=f"marts_for_{run_date.isoformat()}")
        for outcome in checkpoint.run(run_id=run_id).run_results.values():
            failed = [_describe_failure(r) for r in outcome.results if not r.success]
            summary[outcome.suite_name] = {
                "success": bool(outcome.success),
                "evaluated": len(outcome.results),
                "failed": failed,
                "row_count": _observed_row_count(outcome.results),
            }
            log.info(
                "GX suite %s: %s rows, %d expectations, %d failed",
                outcome.suite_name,
                summary[outcome.suite_name]["row_count"],
                len(outcome.results),
                len(failed),
            )
        log.info("GX data docs for %s: %s", run_date, data_docs_dir() / "index.html")

    _record_run(url, run_date, summary)
    log.info(
        "validated %d marts for %s in %.1fs", len(summary), run_date, time.perf_counter() - started
    )

    failing = {name: s["failed"] for name, s in summary.items() if not s["success"]}
    if failing:
        lines = [f"{name}: {failure}" for name, failures in failing.items() for failure in failures]
        raise DataCheckError(
            f"data checks failed for run {run_date} in {', '.join(failing)}:\n  "
            + "\n  ".join(lines)
        )
    return summary
