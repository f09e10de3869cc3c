"""GX suites pass on marts built from good data and name the expectation a defect breaks."""

from __future__ import annotations

import psycopg
import pytest
from sqlalchemy.engine import make_url
from test_transform import RUN_DATE, insert_tiny_dataset

from data_checks.validate import DataCheckError, data_docs_dir, sqlalchemy_url, validate_marts
from rec.transform import run_dbt

SUITES = {"user_interest_features", "user_features", "expert_features", "choice_training_slates"}


def test_sqlalchemy_url_keeps_socket_folders():
    url = make_url(sqlalchemy_url("postgresql://postgres:@/rec?host=/tmp/pg%20sock&port=5433"))
    assert (url.drivername, url.username, url.host, url.port) == (
        "postgresql+psycopg",
        "postgres",
        None,
        5433,
    )
    assert url.database == "rec" and url.query == {"host": "/tmp/pg sock"}

    libpq = "host=db.internal port=6432 user=rec password=s3cret dbname=rec"
    assert sqlalchemy_url(libpq) == "postgresql+psycopg://rec:s3cret@db.internal:6432/rec"
    assert make_url(sqlalchemy_url(libpq, schema="analytics")).query == {
        "options": "-csearch_path=analytics"
    }


def test_marts_pass_and_defects_stop_the_run(fresh_database):
    insert_tiny_dataset(fresh_database)
    run_dbt(RUN_DATE, fresh_database)

    summary = validate_marts(RUN_DATE, fresh_database)
    assert set(summary) == SUITES
    assert all(suite["success"] and suite["evaluated"] >= 8 for suite in summary.values())
    assert all(suite["failed"] == [] for suite in summary.values())

    site = data_docs_dir()
    pages = list((site / "validations").rglob("*.html"))
    assert {page.relative_to(site / "validations").parts[0] for page in pages} >= SUITES
    assert "marts_for_2024-03-10" in "".join(str(page) for page in pages)
    index = (site / "index.html").read_text()
    assert all(name in index for name in SUITES)

    with psycopg.connect(fresh_database) as conn:
        conn.execute(
            "update analytics.user_interest_features set interest = 1.7"
            " where user_id = 1 and topic_id = 1"
        )
        conn.execute("delete from analytics.user_features where user_id = 3")

    with pytest.raises(DataCheckError) as raised:
        validate_marts(RUN_DATE, fresh_database)
    # The failing run gets pages of its own beside the passing run's.
    assert len(list((site / "validations").rglob("*.html"))) == len(pages) + len(SUITES)
    message = str(raised.value)
    assert "user_interest_features: expect_column_values_to_be_between column=interest" in message
    assert "[1.7]" in message
    assert "interest shares sum to 1 per user" in message
    assert "user_features: expect_table_row_count_to_equal (value=3): observed 2" in message
    assert "expert_features" not in message and "choice_training_slates" not in message


def test_missing_mart_is_a_data_check_failure(fresh_database):
    insert_tiny_dataset(fresh_database)
    run_dbt(RUN_DATE, fresh_database)
    with psycopg.connect(fresh_database) as conn:
        conn.execute("drop table analytics.expert_features")

    with pytest.raises(DataCheckError, match=r"expert_features: .*does not exist"):
        validate_marts(RUN_DATE, fresh_database)
