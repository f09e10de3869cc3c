"""`rec ingest open-bandit`: one campaign folder of the Open Bandit Dataset into the app
schema, then through the same extract, dbt and Great Expectations steps as the app's events.

Mapping: users are the distinct combinations of the hashed user features; items become
services of the campaign; an item's first categorical feature is its topic and the pair of
its first two categorical features its expert; impressions keep their 0-based position,
propensity and timestamp; clicks become click events of the impression's slate. Each row is
a slate of its own (the files do not say which rows shared a page).

New ids continue after the largest id already in the app tables and are recorded in the
`ingest` schema, so loading again, or loading the other policy's or another campaign's
folder, reuses them. The dataset should still get a database of its own: the marts would
otherwise mix its users and items with the simulated world's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from datetime import UTC, datetime, timedelta
from datetime import time as day_time
from pathlib import Path

import psycopg

from rec.db import copy_rows, database_url, transaction
from rec.ingest.open_bandit_files import CampaignLog, read_campaign

log = logging.getLogger(__name__)

SLATE_NAMESPACE = uuid.UUID("5d1c6c8e-7a51-4f0e-9f43-0b5e2d0a0b5d")
PLACEHOLDER_PRICE = 0
PLACEHOLDER_DURATION_MINUTES = 1


def _user_key(features) -> str:
    return hashlib.sha256("|".join(features).encode()).hexdigest()


def _next_ids(conn: psycopg.Connection, table: str, column: str, mapping: str,
              mapped_column: str) -> int:
    """The first id above every id in the app table and in its mapping table."""
    return conn.execute(
        f"select greatest((select coalesce(max({column}), 0) from {table}),"
        f" (select coalesce(max({mapped_column}), 0) from {mapping})) + 1").fetchone()[0]


def _upsert_catalogue(conn: psycopg.Connection, data: CampaignLog) -> dict[int, int]:
    """Topics, experts and services of the campaign's items; returns item row -> service_id."""
    items, first_seen = data.items, min(data.timestamp)
    names = items.categorical_names
    topic_names = [f"obd {names[0]}={value}" for value in items.categorical[:, 0]]
    next_topic = conn.execute("select coalesce(max(topic_id), -1) + 1 from app.topics"
                              ).fetchone()[0]
    for name in dict.fromkeys(topic_names):
        inserted = conn.execute("insert into app.topics (topic_id, name) values (%s, %s)"
                                " on conflict (name) do nothing", (next_topic, name)).rowcount
        next_topic += inserted
    topic_ids = dict(conn.execute("select name, topic_id from app.topics"
                                  " where name = any(%s)", (topic_names,)).fetchall())

    # Limitation: a campaign with a single categorical item feature gets one expert per topic.
    expert_keys = ["|".join(row[:2]) for row in items.categorical]
    next_expert = _next_ids(conn, "app.experts", "expert_id", "ingest.open_bandit_experts",
                            "expert_id")
    for key, topic_name in dict(zip(expert_keys, topic_names, strict=True)).items():
        if conn.execute("select 1 from ingest.open_bandit_experts where expert_key = %s",
                        (key,)).fetchone():
            continue
        conn.execute("insert into app.experts (expert_id, name, topic_id, joined_at)"
                     " values (%s, %s, %s, %s)",
                     (next_expert, f"obd expert {key.split('|')[-1][:8]}",
                      topic_ids[topic_name], first_seen))
        conn.execute("insert into ingest.open_bandit_experts (expert_key, expert_id)"
                     " values (%s, %s)", (key, next_expert))
        next_expert += 1
    expert_ids = dict(conn.execute("select expert_key, expert_id from ingest.open_bandit_experts"
                                   ).fetchall())

    next_service = _next_ids(conn, "app.services", "service_id", "ingest.open_bandit_items",
                             "service_id")
    services = {}
    for row, item_id in enumerate(items.item_ids):
        found = conn.execute("select service_id from ingest.open_bandit_items"
                             " where campaign = %s and item_id = %s",
                             (data.campaign, int(item_id))).fetchone()
        if found is None:
            # Limitation: the dataset has no price or duration; the app's columns require
            # them, so they hold placeholders that nothing downstream of the ingest reads.
            conn.execute(
                "insert into app.services (service_id, expert_id, topic_id, title, price,"
                " duration_minutes, is_active, created_at) values (%s, %s, %s, %s, %s, %s,"
                " true, %s)",
                (next_service, expert_ids[expert_keys[row]], topic_ids[topic_names[row]],
                 f"{data.campaign} item {item_id}", PLACEHOLDER_PRICE,
                 PLACEHOLDER_DURATION_MINUTES, first_seen))
            conn.execute(
                "insert into ingest.open_bandit_items (campaign, item_id, service_id,"
                " item_numeric, item_categorical) values (%s, %s, %s, %s, %s)",
                (data.campaign, int(item_id), next_service, float(items.numeric[row]),
                 list(items.categorical[row])))
            found = (next_service,)
            next_service += 1
        services[row] = found[0]
    return services


def _upsert_users(conn: psycopg.Connection, data: CampaignLog) -> list[int]:
    """One app user per distinct user-feature combination; returns each row's user_id."""
    keys = [_user_key(features) for features in data.user_features]
    first_seen: dict[str, tuple[datetime, list[str]]] = {}
    for key, stamp, features in zip(keys, data.timestamp, data.user_features, strict=True):
        if key not in first_seen or stamp < first_seen[key][0]:
            first_seen[key] = (stamp, list(features))
    known = dict(conn.execute("select user_key, user_id from ingest.open_bandit_users"
                              " where user_key = any(%s)", (list(first_seen),)).fetchall())
    next_user = _next_ids(conn, "app.users", "user_id", "ingest.open_bandit_users", "user_id")
    for key, (stamp, features) in first_seen.items():
        if key in known:
            conn.execute("update app.users set signed_up_at = least(signed_up_at, %s)"
                         " where user_id = %s", (stamp, known[key]))
            continue
        conn.execute("insert into app.users (user_id, signed_up_at) values (%s, %s)",
                     (next_user, stamp))
        conn.execute("insert into ingest.open_bandit_users (user_key, user_id, user_features)"
                     " values (%s, %s, %s)", (key, next_user, features))
        known[key] = next_user
        next_user += 1
    return [known[key] for key in keys]


def load_campaign(data: CampaignLog, run_id: str, url: str | None = None) -> dict[str, int]:
    """Write one read campaign log into the app schema, replacing an earlier load of it.

    Returns:
        rows read, accepted and quarantined (log file and item context together), users,
        services, impressions and clicks written.
    """
    source = data.source
    item_file_rows = len(data.items.item_ids) + sum(
        q.source_file == "item_context.csv" for q in data.quarantined)
    with transaction(url) as conn:
        conn.execute("select pg_advisory_xact_lock(hashtext('rec.ingest.open_bandit'))")
        foreign = conn.execute("select count(*) from app.users u where not exists (select 1"
                               " from ingest.open_bandit_users m where m.user_id = u.user_id)"
                               ).fetchone()[0]
        if foreign:
            log.warning("the database also holds %d users that are not from the dataset: its"
                        " marts will mix both", foreign)
        services = _upsert_catalogue(conn, data)
        users = _upsert_users(conn, data)

        conn.execute("delete from app.impressions where source = %s", (source,))
        conn.execute("delete from app.events where payload->>'source' = %s", (source,))
        for table in ("open_bandit_contexts", "open_bandit_quarantine", "open_bandit_loads"):
            conn.execute(f"delete from ingest.{table} where source = %s", (source,))

        slates = [uuid.uuid5(SLATE_NAMESPACE, f"{source}:{i}") for i in data.row_index]
        rows = list(zip(slates, users, (services[i] for i in data.item), data.position,
                        data.propensity, data.timestamp, strict=True))
        impressions = copy_rows(
            conn, "app.impressions",
            ("slate_id", "user_id", "service_id", "position", "propensity", "source", "shown_at"),
            ((s, u, v, int(p), float(q), source, t) for s, u, v, p, q, t in rows))
        clicks = copy_rows(
            conn, "app.events",
            ("event_type", "user_id", "service_id", "slate_id", "occurred_at", "payload"),
            (("click", u, v, s, t, json.dumps({"source": source, "position": int(p)}))
             for (s, u, v, p, _, t), c in zip(rows, data.click, strict=True) if c))
        copy_rows(conn, "ingest.open_bandit_contexts",
                  ("source", "row_index", "slate_id", "user_item_affinity"),
                  ((source, int(i), s, [float(a) for a in aff])
                   for i, s, aff in zip(data.row_index, slates, data.affinity, strict=True)))

        quarantined = copy_rows(
            conn, "ingest.open_bandit_quarantine",
            ("source", "source_file", "line_number", "reason", "row_data", "run_id"),
            ((source, q.source_file, q.line_number, q.reason, json.dumps(q.row), run_id)
             for q in data.quarantined))
        log_file = f"{data.campaign}.csv"
        for name, read, accepted in (("item_context.csv", item_file_rows,
                                      len(data.items.item_ids)),
                                     (log_file, data.rows_read, len(data.item))):
            conn.execute(
                "insert into ingest.open_bandit_loads (source, source_file, run_id, rows_read,"
                " rows_accepted, rows_quarantined) values (%s, %s, %s, %s, %s, %s)",
                (source, name, run_id, read, accepted, read - accepted))
    return {
        "rows_read": data.rows_read + item_file_rows,
        "rows_accepted": len(data.item) + len(data.items.item_ids),
        "rows_quarantined": quarantined,
        "users": len(set(users)),
        "services": len(services),
        "impressions": impressions,
        "clicks": clicks,
    }


def ingest_open_bandit(
    path: str | Path, campaign: str | None = None, url: str | None = None,
    *, build: bool = True,
) -> dict:
    """Load a campaign folder, extract its days, build the marts and validate them.

    Args:
        path: the campaign folder (`random/men`), or its policy folder with `campaign`.
        campaign: the campaign's name; the folder's name when None.
        url: the database; the configured one when None.
        build: run extract, dbt and the data checks after loading.

    Returns:
        The load's counts, then per day the extraction's, then dbt's and the checks' summaries.

    Raises:
        RuntimeError: dbt failed. data_checks.validate.DataCheckError: a suite failed.
    """
    started = time.perf_counter()
    url = url or database_url()
    data = read_campaign(path, campaign)
    run_id = f"open-bandit-{data.source}-{datetime.now(UTC):%Y%m%dT%H%M%S}"
    summary: dict = {"source": data.source, "run_id": run_id,
                     "load": load_campaign(data, run_id, url)}
    log.info("loaded %s: %s", data.source, summary["load"])
    if not build or not data.timestamp:
        return summary

    from data_checks.validate import validate_marts
    from rec.extract import extract_day
    from rec.transform import run_dbt

    days = sorted({stamp.astimezone(UTC).date() for stamp in data.timestamp})
    summary["extract"] = {}
    for day in days:
        start = datetime.combine(day, day_time(), tzinfo=UTC)
        summary["extract"][day.isoformat()] = extract_day(
            start, start + timedelta(days=1), run_id, url)
    run_date = days[-1] + timedelta(days=1)
    history_days = (days[-1] - days[0]).days + 1
    summary["dbt"] = run_dbt(run_date, url, history_days=history_days)
    summary["data_checks"] = validate_marts(run_date, url)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    log.info("ingested %s in %.1f s", data.source, summary["seconds"])
    return summary
