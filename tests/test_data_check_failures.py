"""Each kind of mart defect the GX suites guard against stops the run with its suite's name.

The tiny dataset of test_transform is built and validated once; then, one at a time, a
defect is written into a mart, the validation must fail naming the suite and the
expectation type, and the mart is put back. The deterministic dataset needs no seed.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest
from test_data_checks import SUITES
from test_transform import RUN_DATE, SLATE_A, SLATE_C, insert_tiny_dataset

from data_checks.validate import DataCheckError, validate_marts
from rec.transform import run_dbt

NEXT_NIGHT = RUN_DATE + datetime.timedelta(days=1)


@contextmanager
def _defect(url: str, mart: str, *statements: str) -> Iterator[None]:
    """Run `statements` against analytics.<mart>, then restore the mart as it was."""
    with psycopg.connect(url) as conn:
        conn.execute(f"create table public.mart_backup as select * from analytics.{mart}")
        for statement in statements:
            conn.execute(statement)
    try:
        yield
    finally:
        with psycopg.connect(url) as conn:
            conn.execute(f"delete from analytics.{mart}")
            conn.execute(f"insert into analytics.{mart} select * from public.mart_backup")
            conn.execute("drop table public.mart_backup")


def _failure(url: str, run_date: datetime.date, suite: str, expectation: str) -> str:
    """The DataCheckError message, checked to name `suite`, `expectation` and no other suite."""
    with pytest.raises(DataCheckError) as raised:
        validate_marts(run_date, url)
    message = str(raised.value)
    assert f"{suite}: {expectation}" in message, message
    assert not any(f"{other}: " in message for other in SUITES - {suite}), message
    return message


def _recorded(url: str) -> list[tuple]:
    with psycopg.connect(url) as conn:
        return conn.execute(
            "select run_date, suite, row_count, success from rec.data_check_runs"
            " order by checked_at, suite"
        ).fetchall()


def test_each_defect_stops_the_run_with_its_suite_and_expectation(fresh_database):
    url = fresh_database
    insert_tiny_dataset(url)
    run_dbt(RUN_DATE, url)
    first = validate_marts(RUN_DATE, url)
    assert all(s["success"] for s in first.values())
    counts = {name: s["row_count"] for name, s in first.items()}
    assert counts["user_features"] == 3 and counts["choice_training_slates"] == 7
    assert {(run_date, suite, n, ok) for run_date, suite, n, ok in _recorded(url)} == {
        (RUN_DATE, suite, counts[suite], True) for suite in SUITES
    }

    # Stale features: the slates stop on 3 March, a week before the run date.
    with _defect(
        url,
        "choice_training_slates",
        "update analytics.choice_training_slates set event_date = event_date - 6",
    ):
        message = _failure(
            url,
            RUN_DATE,
            "choice_training_slates",
            "expect_column_max_to_be_between column=event_date",
        )
    assert "stale features: the newest slate is from 2024-03-08 or later" in message
    assert "observed 2024-03-03" in message

    # A null spike: three of the seven impressions lost their propensity.
    with _defect(
        url,
        "choice_training_slates",
        "update analytics.choice_training_slates set propensity = null"
        f" where slate_id = '{SLATE_A}'",
    ):
        message = _failure(
            url,
            RUN_DATE,
            "choice_training_slates",
            "expect_column_values_to_not_be_null column=propensity",
        )
    assert "null spike" in message and "3 unexpected of 7" in message

    # Interest out of range, below zero this time (the other test pushes one above one).
    with _defect(
        url,
        "user_interest_features",
        "update analytics.user_interest_features set interest = -0.25"
        " where user_id = 1 and topic_id = 1",
    ):
        message = _failure(
            url,
            RUN_DATE,
            "user_interest_features",
            "expect_column_values_to_be_between column=interest",
        )
    assert "[-0.25]" in message

    # A user with interactions but no last active date.
    with _defect(
        url,
        "user_features",
        "update analytics.user_features set last_active_date = null where user_id = 1",
    ):
        message = _failure(url, RUN_DATE, "user_features", "unexpected_rows_expectation")
    assert "users with interactions have a last active date" in message

    # A cold-start user (3, no interactions) with more interest weight than the sign-up
    # topics' prior can give.
    with _defect(
        url,
        "user_features",
        "update analytics.user_features set total_decayed_weight = 2.5 where user_id = 3",
    ):
        message = _failure(url, RUN_DATE, "user_features", "unexpected_rows_expectation")
    assert "no interest weight beyond their sign-up topics' prior" in message

    # The next night: a quiet 10 March (no slates) is neither stale nor a collapse.
    run_dbt(NEXT_NIGHT, url)
    with psycopg.connect(url) as conn:
        conn.execute(f"delete from analytics.choice_training_slates where slate_id = '{SLATE_C}'")
    assert all(s["success"] for s in validate_marts(NEXT_NIGHT, url).values())

    # A row-count collapse against the first night's seven slates: two are left.
    with _defect(
        url,
        "choice_training_slates",
        "delete from analytics.choice_training_slates where position > 0"
        f" or slate_id = '{SLATE_A}'",
    ):
        message = _failure(
            url, NEXT_NIGHT, "choice_training_slates", "expect_table_row_count_to_be_between"
        )
    assert "row count collapse: at least 50% of the 7 rows validated for 2024-03-10" in message
    assert "observed 2" in message

    # Every validation is on record; the failed ones never become a baseline.
    recorded = _recorded(url)
    assert len(recorded) == 8 * len(SUITES)
    failed = {(run_date, suite, n) for run_date, suite, n, ok in recorded if not ok}
    assert failed == {
        (RUN_DATE, "choice_training_slates", 7),
        (RUN_DATE, "user_interest_features", counts["user_interest_features"]),
        (RUN_DATE, "user_features", 3),
        (NEXT_NIGHT, "choice_training_slates", 2),
    }
