"""The dbt graph read from the project's files, source freshness, and the docs site."""

from __future__ import annotations

import json

import psycopg
import pytest
from test_transform import RUN_DATE, insert_tiny_dataset

from rec.config import REPO_ROOT
from rec.dbt_graph import load_models, models_before_tests
from rec.transform import generate_docs, run_dbt


def test_graph_matches_the_refs_in_the_project(tmp_path):
    models = load_models(REPO_ROOT / "dbt_project")
    assert models["user_interest_features"].refs == {"int_user_topic_daily_weights"}
    assert models["user_interest_features"].layer == "marts"
    assert models["stg_app__users"].refs == set()
    assert models["stg_app__impressions"].test_refs == {"stg_app__users", "stg_app__services"}
    needs = models_before_tests(models)
    assert needs["stg_app__users"] >= {"stg_app__users", "stg_app__impressions"}

    (tmp_path / "models" / "marts").mkdir(parents=True)
    (tmp_path / "models" / "marts" / "orphan.sql").write_text("select * from {{ ref('gone') }}")
    with pytest.raises(ValueError, match=r"orphan refers to unknown models \['gone'\]"):
        load_models(tmp_path)


def _extraction_at(url: str, age: str) -> None:
    with psycopg.connect(url) as conn:
        conn.execute("delete from raw.extract_runs")
        conn.execute(
            "insert into raw.extract_runs (event_date, source_table, run_id, rows_read,"
            " rows_accepted, rows_quarantined, extracted_at)"
            " values (%s, 'impressions', 'test', 1, 1, 0, now() - %s::interval)",
            (RUN_DATE, age),
        )
        conn.execute("update raw.impressions set extracted_at = now() - %s::interval", (age,))


def test_source_freshness_stops_on_a_stale_extraction(fresh_database):
    insert_tiny_dataset(fresh_database)
    _extraction_at(fresh_database, "1 hour")
    summary = run_dbt(RUN_DATE, fresh_database, command="source freshness")
    assert summary["failed"] == 0 and summary["passed"] == 2

    _extraction_at(fresh_database, "3 days")
    with pytest.raises(RuntimeError, match=r"source\.rec_features\.app\.extract_runs \(error\)"):
        run_dbt(RUN_DATE, fresh_database, command="source freshness")


def test_docs_site_has_lineage_and_catalog(fresh_database, rec_home):
    insert_tiny_dataset(fresh_database)
    run_dbt(RUN_DATE, fresh_database)

    index = generate_docs(RUN_DATE, fresh_database)
    assert index == rec_home / "dbt" / "docs" / "index.html"
    manifest = json.loads((index.parent / "manifest.json").read_text())
    assert "exposure.rec_features.recommendations" in manifest["exposures"]
    catalog = json.loads((index.parent / "catalog.json").read_text())
    assert "model.rec_features.user_features" in catalog["nodes"]
