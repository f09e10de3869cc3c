"""A week backfilled through Airflow gives the same lists as the same nights run one by one.

Sequential: a small world plays day d and `rec_nightly` runs for d+1 (`airflow dags test`),
for a week of days, in database A with an Airflow home of its own. Backfill: a second
database B receives A's logged app events (the world cannot react during a backfill, which
replays logged days), and `airflow backfill create --dag-id rec_nightly` over the same week
runs in a fresh Airflow home with a scheduler stack (api-server, dag-processor, scheduler,
LocalExecutor), one run at a time. It then compares every row of `rec.recommendations`
(run date, user, rank, service, expert, score, propensity) between A and B, and prints the
wall time of both and one JSON line. That line also locates any difference: differing rows
per run date, rows of the final dbt marts that differ, and the model metrics
(`rec.model_runs`, wall times aside) that differ per date and stage.

Both halves must run the same code: the publishing kernel (`rec.native`) is rebuilt from
its source whenever that changes, so editing the tree while the bench runs shows up as
differing scores. Run it from a checkout nobody edits meanwhile.

Slow (fourteen nightly runs): a benchmark run by hand, never by `make test`.

    .venv/bin/python bench/backfill.py [--days 7] [--users 200] [--experts 20] [--steps 10] [--keep]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from datetime import date, timedelta
from pathlib import Path

import psycopg

from rec import db
from rec.experiment import Arm, arm_environment, database_on
from rec.orchestrate import run_backfill, run_dag
from rec.world.generate import WorldSpec, seed_world
from rec.world.traffic import simulate_day

APP_TABLES = ("app.topics", "app.experts", "app.services", "app.users", "app.impressions",
              "app.events", "app.bookings", "app.reviews")
COMPARED = "run_date, user_id, rank, service_id, expert_id, score, propensity"


def copy_app_tables(source_url: str, target_url: str) -> dict[str, int]:
    """Copy the logged app tables from one database into another (binary COPY)."""
    copied = {}
    with psycopg.connect(source_url) as source, psycopg.connect(target_url) as target:
        for table in APP_TABLES:
            rows = 0
            with source.cursor().copy(f"copy {table} to stdout (format binary)") as out, \
                    target.cursor().copy(f"copy {table} from stdin (format binary)") as into:
                for chunk in out:
                    into.write(chunk)
            rows = target.execute(f"select count(*) from {table}").fetchone()[0]
            copied[table] = rows
        target.commit()
    return copied


def lists(url: str, first: date, last: date) -> list[tuple]:
    with psycopg.connect(url) as conn:
        return conn.execute(
            f"select {COMPARED} from rec.recommendations where run_date between %s and %s"
            " order by run_date, user_id, rank", (first, last)).fetchall()


def _hashable(row: tuple) -> tuple:
    return tuple(tuple(v) if isinstance(v, list) else v for v in row)


def marts_differing(url_a: str, url_b: str) -> dict[str, int]:
    """Rows of each `analytics` table in one database and not the other (both ways).

    Both databases end on the same run date, so their marts should hold the same rows.
    """
    found = {}
    with psycopg.connect(url_a) as a, psycopg.connect(url_b) as b:
        tables = [r[0] for r in a.execute(
            "select table_name from information_schema.tables where table_schema = 'analytics'"
            " order by table_name")]
        for table in tables:
            query = f"select * from analytics.{table}"
            rows_a = Counter(map(_hashable, a.execute(query).fetchall()))
            rows_b = Counter(map(_hashable, b.execute(query).fetchall()))
            found[table] = sum(((rows_a - rows_b) + (rows_b - rows_a)).values())
    return found


# Metrics that differ between any two runs: wall times, and paths or versions named by run.
RUN_NAMED = ("warm_start", "champion_before", "challenger_version", "previous_champion")


def _without_timings(value):
    """The metrics with wall-time figures (`seconds`, `*_seconds`, `*_s`) left out, at any depth."""
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items()
                if not (k == "seconds" or k.endswith(("_seconds", "_s")) or k in RUN_NAMED)}
    return value


def metrics_differing(url_a: str, url_b: str) -> dict[str, list[str]]:
    """For each (run date, stage) of rec.model_runs, the top-level metrics that differ
    (wall times aside)."""
    query = ("select run_date, stage, metrics from rec.model_runs m where created_at ="
             " (select max(created_at) from rec.model_runs n where n.run_date = m.run_date"
             " and n.stage = m.stage)")
    with psycopg.connect(url_a) as a, psycopg.connect(url_b) as b:
        runs_a = {(str(r[0]), r[1]): r[2] for r in a.execute(query)}
        runs_b = {(str(r[0]), r[1]): r[2] for r in b.execute(query)}
    found = {}
    for key in sorted(runs_a.keys() | runs_b.keys()):
        ma, mb = _without_timings(runs_a.get(key, {})), _without_timings(runs_b.get(key, {}))
        keys = sorted(k for k in ma.keys() | mb.keys() if ma.get(k) != mb.get(k))
        if keys:
            found[f"{key[0]} {key[1]}"] = keys
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--days", type=int, default=7)
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--experts", type=int, default=20)
    parser.add_argument("--steps", type=int, default=10, help="agent steps per night")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true",
                        help="keep both databases (their names are printed) to inspect")
    args = parser.parse_args()
    # A SIGTERM unwinds like an exception, so the scheduler stack stops and the databases go.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    folder = Path(tempfile.mkdtemp(prefix="rec-backfill-"))
    os.environ.setdefault("REC_HOME", str(folder / "server"))
    server = db.database_url()
    tag = uuid.uuid4().hex[:8]
    names = {"sequential": f"backfill_{tag}_seq", "backfill": f"backfill_{tag}_bf"}
    with psycopg.connect(server, autocommit=True) as conn:
        for name in names.values():
            conn.execute(f'create database "{name}"')
    arms = {k: Arm(k, database_on(server, v), folder / k, folder / k / "airflow")
            for k, v in names.items()}
    for arm in arms.values():
        db.migrate(arm.url)
    spec = WorldSpec(users=args.users, experts=args.experts, seed=args.seed)
    conf = {"agent_steps": args.steps}
    first_run = spec.start_date + timedelta(days=1)
    last_run = spec.start_date + timedelta(days=args.days)

    try:
        seq = arms["sequential"]
        started = time.perf_counter()
        with arm_environment(seq):
            with psycopg.connect(seq.url) as conn:
                seed_world(conn, spec)
                conn.commit()
            for d in range(args.days):
                day = spec.start_date + timedelta(days=d)
                with db.transaction(seq.url) as conn:
                    simulate_day(conn, day)
                run_dag("rec_nightly", day + timedelta(days=1), conf)
        sequential_s = time.perf_counter() - started

        bf = arms["backfill"]
        copied = copy_app_tables(seq.url, bf.url)
        started = time.perf_counter()
        with arm_environment(bf):
            states = run_backfill("rec_nightly", first_run, last_run, conf)
        backfill_s = time.perf_counter() - started

        a, b = lists(seq.url, first_run, last_run), lists(bf.url, first_run, last_run)
        differing = sum(x != y for x, y in zip(a, b, strict=False)) + abs(len(a) - len(b))
        by_date = {str(d): sum(x != y for x, y in zip(a, b, strict=False) if x[0] == d)
                   for d in sorted({x[0] for x in a})}
        marts = marts_differing(seq.url, bf.url)
        metrics = metrics_differing(seq.url, bf.url)
        same_slots = sum(x[:5] == y[:5] for x, y in zip(a, b, strict=False))
        max_score_diff = max((abs(x[5] - y[5]) for x, y in zip(a, b, strict=False)
                              if x[:5] == y[:5]), default=0.0)
    finally:
        if args.keep:
            print(f"databases kept: {', '.join(names.values())} on {server}")
        else:
            with psycopg.connect(server, autocommit=True) as conn:
                for name in names.values():
                    conn.execute(f'drop database if exists "{name}" with (force)')

    print(f"sequential dags test: {args.days} runs in {sequential_s:.0f}s")
    print(f"backfill:             {len(states)} runs in {backfill_s:.0f}s "
          f"(ratio {backfill_s / sequential_s:.2f})")
    print(f"rows: sequential {len(a)}, backfill {len(b)}; rows that differ: {differing}; "
          f"same (date, user, rank, service, expert): {same_slots}")
    print(json.dumps({"days": args.days, "users": args.users, "rows_sequential": len(a),
                      "rows_backfill": len(b), "rows_differing": differing,
                      "same_slots": same_slots, "max_score_diff": max_score_diff,
                      "differing_by_date": by_date, "marts_rows_differing": marts,
                      "metrics_differing": metrics,
                      "identical": differing == 0 and len(a) > 0,
                      "app_rows_copied": copied, "backfill_states": states,
                      "sequential_s": round(sequential_s, 1),
                      "backfill_s": round(backfill_s, 1)}))
    raise SystemExit(0 if differing == 0 and a else 1)


if __name__ == "__main__":
    main()
