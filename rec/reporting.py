"""A daily summary of the published lists, for the reporting DAG that runs on each publish."""

from __future__ import annotations

import datetime
import logging

from rec.db import connect

log = logging.getLogger(__name__)

SUMMARY_SQL = """
with lists as (
    select * from rec.recommendations where run_date = %(run_date)s
),
top_of_list as (
    select service_id, count(*) as users from lists where rank = 1
    group by service_id order by users desc, service_id limit 1
)
select
    count(distinct lists.user_id),
    count(*),
    count(distinct lists.service_id),
    count(distinct lists.expert_id),
    (select count(*) from app.services where is_active),
    avg(lists.score),
    (select users from top_of_list),
    coalesce(string_agg(distinct lists.model_version, ','), '')
from lists
"""


def latest_run_date(url: str | None = None) -> datetime.date | None:
    """The newest date with published lists, or None before the first publish."""
    with connect(url) as conn:
        return conn.execute("select max(run_date) from rec.recommendations").fetchone()[0]


def daily_summary(run_date: datetime.date, url: str | None = None) -> dict:
    """Figures of one date's lists: reach, catalogue coverage and how concentrated they are.

    Returns:
        run_date, users, rows, services, experts, catalogue_coverage (share of active
        services shown to someone), mean_score, top1_share (share of users whose first
        slot is the most common first service) and model_versions.
    """
    with connect(url) as conn:
        row = conn.execute(SUMMARY_SQL, {"run_date": run_date}).fetchone()
    users, rows, services, experts, active, mean_score, top1_users, versions = row
    summary = {
        "run_date": run_date.isoformat(),
        "users": users,
        "rows": rows,
        "services": services,
        "experts": experts,
        "catalogue_coverage": round(services / active, 4) if active else 0.0,
        "mean_score": round(float(mean_score), 4) if mean_score is not None else None,
        "top1_share": round(top1_users / users, 4) if users else 0.0,
        "model_versions": [v for v in versions.split(",") if v],
    }
    log.info(
        "lists of %s: %d users, %d rows, %d services (%.0f%% of the catalogue), top-1 share %.2f",
        run_date,
        users,
        rows,
        services,
        100 * summary["catalogue_coverage"],
        summary["top1_share"],
    )
    return summary
