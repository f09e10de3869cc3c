"""A week backfilled through Airflow gives the same lists as the same nights run one by one.

Sequential: a small world plays day d and `rec_nightly` runs for d+1 (`airflow dags test`),
for a week of days, in database A with an Airflow home of its own. Backfill: a second
database B receives A's logged app events (the world cannot react during a backfill, which
replays logged days), and `airflow backfill create --dag-id rec_nightly` over the same week
runs in a fresh Airflow home with a scheduler stack (api-server, dag-processor, scheduler,
LocalExecutor), one run at a time. It then compares every row of `rec.recommendations`
(run date, user, rank, service, expert, score, propensity) between A and B, and prints the
wall time of both and one JSON line.

Slow (fourteen nightly runs): a benchmark run by hand, never by `make test`.

    .venv/bin/python bench/backfill.py [--days 7] [--users 200] [--experts 20] [--steps 10]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--days", type=int, default=7)
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--experts", type=int, default=20)
    parser.add_argument("--steps", type=int, default=10, help="agent steps per night")
    parser.add_argument("--seed", type=int, default=0)
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
        same_slots = sum(x[:5] == y[:5] for x, y in zip(a, b, strict=False))
        max_score_diff = max((abs(x[5] - y[5]) for x, y in zip(a, b, strict=False)
                              if x[:5] == y[:5]), default=0.0)
    finally:
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
                      "identical": differing == 0 and len(a) > 0,
                      "app_rows_copied": copied, "backfill_states": states,
                      "sequential_s": round(sequential_s, 1),
                      "backfill_s": round(backfill_s, 1)}))
    raise SystemExit(0 if differing == 0 and a else 1)


if __name__ == "__main__":
    main()
