"""Airflow Assets the pipeline produces, shared by the DAGs that write and read them."""

from __future__ import annotations

from airflow.sdk import Asset

RECOMMENDATIONS = Asset(name="rec_recommendations", uri="rec://recommendations")
"""rec.recommendations: updated when a nightly run has published a date's lists."""
