"""One rec_nightly run at scale: its wall time and each task's seconds, from Airflow.

A world of `--users` users and `--experts` experts plays `--days` days (served by the
world's popularity fallback, no nightly in between); every day but the last is extracted
into `raw` directly, so the night's models see that history. That database is the template
of every night measured: each night runs `rec_nightly` once, through `airflow dags test`,
for the day after, in a copy of it with an Airflow home of its own, so every night starts
from the same state.

With `--against PATH` (another checkout of this repository, e.g. `git worktree add
/tmp/rec-head HEAD`), the nights of this checkout and of that one alternate, `--rounds`
times each, and the figures are printed side by side with their ratio: the machine's load
then weighs on both alike. Each night's figures are its wall time as `rec` saw it (the
`airflow dags test` process, start-up included), the span of its tasks, and every task's
seconds (mapped instances summed). The databases and Airflow homes are removed after.

Slow at the default scale (minutes a night): a benchmark run by hand, never by `make test`.

    .venv/bin/python bench/nightly.py [--users 10000] [--experts 500] [--days 3] [--steps N]
        [--against PATH] [--rounds 1]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from datetime import UTC, date, datetime, timedelta
from datetime import time as clock
from pathlib import Path

import psycopg

THIS_CHECKOUT = Path(__file__).resolve().parent.parent


def _midnight(day: date) -> datetime:
    return datetime.combine(day, clock(0), tzinfo=UTC)


def task_seconds(airflow_db: Path) -> dict[str, float]:
    """Seconds of each task of the (only) rec_nightly run; mapped instances summed."""
    with sqlite3.connect(airflow_db) as conn:
        rows = conn.execute("select task_id, duration from task_instance"
                            " where dag_id = 'rec_nightly'").fetchall()
    seconds: dict[str, float] = defaultdict(float)
    for task_id, duration in rows:
        seconds[task_id] += duration or 0.0
    return dict(seconds)


def task_span(airflow_db: Path) -> float:
    """From the first task's start to the last task's end, in seconds."""
    with sqlite3.connect(airflow_db) as conn:
        first, last = conn.execute(
            "select min(start_date), max(end_date) from task_instance"
            " where dag_id = 'rec_nightly'").fetchone()
    return (datetime.fromisoformat(last) - datetime.fromisoformat(first)).total_seconds()


def play_world(url: str, users: int, experts: int, days: int, seed: int) -> date:
    """Seed and play the world; returns the date of the night to run."""
    from rec import db
    from rec.extract import extract_day
    from rec.world.generate import WorldSpec, seed_world
    from rec.world.traffic import simulate_day

    spec = WorldSpec(users=users, experts=experts, seed=seed)
    db.migrate(url)
    with db.transaction(url) as conn:
        seed_world(conn, spec)
    for d in range(days):
        day = spec.start_date + timedelta(days=d)
        with db.transaction(url) as conn:
            simulate_day(conn, day)
        if d < days - 1:
            extract_day(_midnight(day), _midnight(day + timedelta(days=1)), f"bench__{day}", url)
    return spec.start_date + timedelta(days=days)


def night(url: str, home: Path, run_date: date, steps: int | None) -> dict:
    """Run rec_nightly for `run_date` on the database at `url` (this process's `rec`)."""
    from rec.experiment import Arm, arm_environment
    from rec.orchestrate import ensure_metadata_db, run_dag

    arm = Arm("rl", url, home, home / "airflow")
    with arm_environment(arm):
        ensure_metadata_db()
        started = time.perf_counter()
        run_dag("rec_nightly", run_date, {"agent_steps": steps} if steps else None)
        wall_s = time.perf_counter() - started
    with psycopg.connect(url) as conn:
        rows = conn.execute("select count(*) from rec.recommendations where run_date = %s",
                            (run_date,)).fetchone()[0]
    airflow_db = arm.airflow_home / "airflow.db"
    return {"wall_s": round(wall_s, 1), "span_s": round(task_span(airflow_db), 1),
            "rows": rows, "load_avg_1m": round(os.getloadavg()[0], 2),
            "tasks_s": {k: round(v, 2) for k, v in sorted(task_seconds(airflow_db).items())}}


def night_in(checkout: Path, url: str, home: Path, run_date: date, steps: int | None) -> dict:
    """`night` in a process that imports `rec` from `checkout`."""
    args = [sys.executable, __file__, "--night-of", url, "--home", str(home),
            "--run-date", run_date.isoformat()] + (["--steps", str(steps)] if steps else [])
    env = os.environ | {"PYTHONPATH": str(checkout)}
    result = subprocess.run(args, env=env, cwd=checkout, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"the night in {checkout} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


PER_MODEL_ROW = "dbt.<model>.run and .test, all"


def _row(task_id: str) -> str:
    """The table row of a task: one row for all per-model dbt tasks (older checkouts)."""
    parts = task_id.split(".")
    return PER_MODEL_ROW if len(parts) == 3 and parts[0] == "dbt" else task_id


def _seconds(night: dict, row: str) -> float:
    return sum(s for t, s in night["tasks_s"].items() if _row(t) == row)


def print_side_by_side(names: list[str], nights: dict[str, list[dict]]) -> None:
    """Median of each figure per checkout, and the ratio of the first to the second."""
    def median(name: str, pick) -> float:
        return statistics.median(pick(n) for n in nights[name])

    tasks = sorted({_row(t) for runs in nights.values() for n in runs for t in n["tasks_s"]},
                   key=lambda t: -median(names[-1], lambda n: _seconds(n, t)))
    header = "".join(f"{n[-28:]:>30}" for n in names)
    print(f"{'median seconds':<40}{header}" + ("       ratio" if len(names) == 2 else ""))
    rows = [("nightly wall (dags test process)", lambda n: n["wall_s"]),
            ("tasks span", lambda n: n["span_s"])]
    rows += [(f"  {t}", lambda n, t=t: _seconds(n, t)) for t in tasks]
    rows.append(("  (dbt tasks together)",
                 lambda n: sum(s for t, s in n["tasks_s"].items() if t.startswith("dbt."))))
    for label, pick in rows:
        values = [median(name, pick) for name in names]
        ratio = f"{values[0] / values[1]:12.2f}" if len(values) == 2 and values[1] else ""
        print(f"{label:<40}" + "".join(f"{v:30.1f}" for v in values) + ratio)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--experts", type=int, default=500)
    parser.add_argument("--days", type=int, default=3, help="world days before the night")
    parser.add_argument("--steps", type=int, default=None,
                        help="agent steps of the night (the DAG's default when omitted)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--against", type=Path, default=None,
                        help="another checkout whose nights alternate with this one's")
    parser.add_argument("--rounds", type=int, default=1, help="nights per checkout")
    parser.add_argument("--night-of", help=argparse.SUPPRESS)
    parser.add_argument("--home", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--run-date", type=date.fromisoformat, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.night_of:
        print(json.dumps(night(args.night_of, args.home, args.run_date, args.steps)))
        return

    # A SIGTERM unwinds like an exception, so the databases are dropped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from rec import db
    from rec.experiment import database_on

    folder = Path(tempfile.mkdtemp(prefix="rec-nightly-"))
    os.environ.setdefault("REC_HOME", str(folder / "server"))
    server = db.database_url()
    tag = uuid.uuid4().hex[:8]
    template = f"nightly_{tag}_world"
    checkouts = [THIS_CHECKOUT] + ([args.against.resolve()] if args.against else [])
    names = [str(c) for c in checkouts]
    nights: dict[str, list[dict]] = {name: [] for name in names}
    created = [template]
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'create database "{template}"')
    try:
        started = time.perf_counter()
        run_date = play_world(database_on(server, template), args.users, args.experts,
                              args.days, args.seed)
        logging.info("world of %d users, %d experts played %d days in %.0fs", args.users,
                     args.experts, args.days, time.perf_counter() - started)
        for round_ in range(args.rounds):
            # Alternate which checkout goes first, so neither always meets the same load.
            order = checkouts if round_ % 2 == 0 else checkouts[::-1]
            for i, checkout in enumerate(order):
                name = f"nightly_{tag}_r{round_}_{i}"
                with psycopg.connect(server, autocommit=True) as conn:
                    conn.execute(f'create database "{name}" template "{template}"')
                created.append(name)
                figures = night_in(checkout, database_on(server, name),
                                   folder / name, run_date, args.steps)
                nights[str(checkout)].append(figures)
                logging.info("%s: night of %s in %.1fs (%d rows)", checkout, run_date,
                             figures["wall_s"], figures["rows"])
    finally:
        with psycopg.connect(server, autocommit=True) as conn:
            for name in created:
                conn.execute(f'drop database if exists "{name}" with (force)')

    print(f"world: {args.users} users, {args.experts} experts, {args.days} days; "
          f"night of {run_date}; {args.rounds} night(s) per checkout")
    print_side_by_side(names, nights)
    print(json.dumps({"users": args.users, "experts": args.experts, "days": args.days,
                      "nights": nights}))


if __name__ == "__main__":
    main()
