"""The demo loop: the world plays a day, then the nightly DAG learns from it, day after day."""

from __future__ import annotations

import json
import logging
import time
from datetime import date, timedelta

from rec import db
from rec.config import REPO_ROOT, airflow_home, artifacts_dir
from rec.orchestrate import run_dag
from rec.world.generate import WorldSpec, seed_world, world_spec
from rec.world.traffic import simulate_day

log = logging.getLogger(__name__)


def _next_world_day(conn, spec: WorldSpec) -> date:
    last = conn.execute("select max(day) from world.days").fetchone()[0]
    return spec.start_date if last is None else last + timedelta(days=1)


def _day_summary(conn, day: date, counts: dict) -> dict:
    published = conn.execute(
        "select count(distinct user_id), count(*), max(model_version)"
        " from rec.recommendations where run_date = %s", (day + timedelta(days=1),)).fetchone()
    metrics = dict(conn.execute(
        "select stage, metrics from rec.model_runs where run_date = %s"
        " and created_at = (select max(created_at) from rec.model_runs m"
        " where m.run_date = %s and m.stage = model_runs.stage)",
        (day + timedelta(days=1), day + timedelta(days=1))).fetchall())
    return {
        "day": day.isoformat(),
        **counts,
        "ctr": counts["clicks"] / max(counts["visits"], 1),
        "published_users": published[0],
        "published_rows": published[1],
        "model_version": published[2],
        "choice_heldout_logloss": metrics.get("choice", {}).get("heldout_logloss"),
        "agent_return": metrics.get("agent", {}).get("final_return"),
    }


def run_demo(days: int, users: int, experts: int, seed: int, as_json: bool = False) -> list:
    """Seed the world once, then for each day: play it and run `rec_nightly` for the next."""
    started = time.perf_counter()
    url = db.database_url()
    db.migrate(url)
    requested = WorldSpec(users=users, experts=experts, seed=seed)
    with db.transaction(url) as conn:
        spec = world_spec(conn)
        if spec is None:
            seed_world(conn, requested)
            spec = requested
        elif (spec.users, spec.experts, spec.seed) != (users, experts, seed):
            log.warning("continuing the world already seeded here (%s), not %s",
                        spec, requested)

    summaries = []
    for _ in range(days):
        with db.transaction(url) as conn:
            day = _next_world_day(conn, spec)
            counts = simulate_day(conn, day)
        run_dag("rec_nightly", day + timedelta(days=1))
        with db.connect(url) as conn:
            summaries.append(_day_summary(conn, day, counts))

    _print_report(summaries, url, time.perf_counter() - started)
    if as_json:
        print(json.dumps(summaries))
    return summaries


def _print_report(summaries: list[dict], url: str, seconds: float) -> None:
    print()
    print(f"{'day':<11} {'visits':>6} {'clicks':>6} {'ctr':>6} {'bookings':>8} "
          f"{'listed':>6}  model")
    for s in summaries:
        print(f"{s['day']:<11} {s['visits']:>6} {s['clicks']:>6} {s['ctr']:>6.3f} "
              f"{s['bookings']:>8} {s['published_users']:>6}  {s['model_version']}")
    print(f"\n{len(summaries)} day(s) in {seconds:.0f}s. Where to look next:")
    print(f"  database            {url}")
    print("  one user's list     .venv/bin/rec recommend --user 1")
    print("  the table           psql \"$(.venv/bin/rec db url)\" -c "
          "'select * from rec.recommendations order by run_date desc, user_id, rank limit 20'")
    print("  run figures         select * from rec.model_runs order by created_at desc")
    print(f"  models              {artifacts_dir()}")
    print(f"  Airflow UI          .venv/bin/rec airflow standalone   (home: {airflow_home()})")
    print(f"  dbt project         {REPO_ROOT / 'dbt_project'}")
