"""The demo loop: the world plays a day, then the nightly DAG learns from it, day after day.

With arms, the same loop runs the closed-loop experiment (`rec.experiment`): one copy of
the world per arm, each served by the rankings its own pipeline publishes.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from datetime import date, timedelta
from pathlib import Path

from rec import db
from rec.config import REPO_ROOT, airflow_home, artifacts_dir, rec_home
from rec.experiment import (
    Arm,
    arm_environment,
    days_played,
    experiment_tag,
    last_played,
    prepare_arms,
    record_timing,
    write_report,
)
from rec.orchestrate import run_dag
from rec.world.generate import WorldSpec, seed_world, world_spec
from rec.world.traffic import simulate_day

log = logging.getLogger(__name__)

SIDE_BY_SIDE = "REC_EXPERIMENT_SIDE_BY_SIDE"
"""Set in the environment of an arm's own process under `--parallel`."""
REPORT_EVERY_DAYS = 3
"""An experiment rewrites its report every this many days, so a long run shows progress."""


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


def run_demo(days: int, users: int, experts: int, seed: int, as_json: bool = False,
             arms: list[str] | None = None, fresh: bool = False,
             parallel: bool = False) -> dict:
    """Play the world and run `rec_nightly` day after day, then write the experiment report.

    Without `arms`, the world in the project's own database plays `days` more days against
    the RL pipeline (run it again to play more). With `arms`, each arm gets a database and
    home of its own under `REC_HOME/experiments/<seed and scale>/`, and every arm is played
    until it has `days` days (a rerun continues an interrupted experiment; `fresh` starts
    it over; `parallel` plays the arms side by side, one process each).

    Returns:
        The report's figures (see `rec.experiment.write_report`).
    """
    started = time.perf_counter()
    spec = WorldSpec(users=users, experts=experts, seed=seed)
    if arms is None:
        figures = _run_project_world(days, spec)
    else:
        figures = _run_arms(days, spec, arms, fresh, parallel)
    print(f"\nreport: {figures['report']}  ({time.perf_counter() - started:.0f}s in all)")
    if as_json:
        print(json.dumps(figures, default=str))
    return figures


def _ensure_world(url: str, requested: WorldSpec) -> WorldSpec:
    with db.transaction(url) as conn:
        spec = world_spec(conn)
        if spec is None:
            seed_world(conn, requested)
            return requested
    if (spec.users, spec.experts, spec.seed) != (requested.users, requested.experts,
                                                 requested.seed):
        log.warning("continuing the world already seeded here (%s), not %s", spec, requested)
    return spec


def _play_day(arm: Arm, spec: WorldSpec) -> tuple[date, dict]:
    """One day of one arm: the world plays it, then rec_nightly runs for the next date."""
    with db.transaction(arm.url) as conn:
        day = _next_world_day(conn, spec)
        counts = simulate_day(conn, day)
    run_started = time.perf_counter()
    run_dag("rec_nightly", day + timedelta(days=1))
    record_timing(arm, day + timedelta(days=1), time.perf_counter() - run_started)
    return day, counts


def _run_project_world(days: int, requested: WorldSpec) -> dict:
    url = db.database_url()
    db.migrate(url)
    spec = _ensure_world(url, requested)
    arm = Arm("rl", url, rec_home(), airflow_home())
    summaries = []
    started = time.perf_counter()
    for _ in range(days):
        day, counts = _play_day(arm, spec)
        with db.connect(url) as conn:
            summaries.append(_day_summary(conn, day, counts))
    _print_report(summaries, url, time.perf_counter() - started)
    folder = rec_home() / "experiments" / "demo"
    with db.connect(url) as conn:
        played = conn.execute("select count(*) from world.days").fetchone()[0]
    return write_report([arm], spec, folder, played)


def _run_arms(days: int, spec: WorldSpec, names: list[str], fresh: bool,
              parallel: bool = False) -> dict:
    """Play every arm until it has `days` days, then write the report of all arms.

    One after another, all arms' day d are played before any arm's day d+1. With
    `parallel`, each arm runs in a `rec demo` process of its own, side by side.
    """
    folder = rec_home() / "experiments" / experiment_tag(spec)
    server = db.database_url()
    arms = prepare_arms(server, folder, spec, names, fresh)
    # An arm played in a process of its own (--parallel) reports into its own folder.
    report_dir = arms[0].home if os.environ.get(SIDE_BY_SIDE) else folder
    for arm in arms:
        _ensure_world(arm.url, spec)
    log.info("experiment %s: arms %s, %d day(s), folder %s", experiment_tag(spec),
             ", ".join(names), days, folder)
    if parallel and len(arms) > 1:
        _run_side_by_side(arms, days, spec)
        return write_report(arms, spec, folder, days)
    for arm in arms:
        _finish_interrupted_night(arm, spec)

    print(f"{'day':<11} {'arm':<10} {'visits':>6} {'clicks':>6} {'ctr':>6} {'bookings':>8} "
          f"{'active':>7} {'nightly s':>9}")
    while min(days_played(a, spec.start_date) for a in arms) < days:
        for arm in arms:
            if days_played(arm, spec.start_date) >= days:
                continue
            with arm_environment(arm):
                run_started = time.perf_counter()
                day, counts = _play_day(arm, spec)
            print(f"{day.isoformat():<11} {arm.name:<10} {counts['visits']:>6} "
                  f"{counts['clicks']:>6} {counts['clicks'] / max(counts['visits'], 1):>6.3f} "
                  f"{counts['bookings']:>8} {counts['active_users']:>7} "
                  f"{time.perf_counter() - run_started:>9.0f}", flush=True)
        played = min(days_played(a, spec.start_date) for a in arms)
        if played % REPORT_EVERY_DAYS == 0 and played < days:
            write_report(arms, spec, report_dir, days)
    return write_report(arms, spec, report_dir, days)


def _finish_interrupted_night(arm: Arm, spec: WorldSpec) -> None:
    """Run the nightly DAG for an arm whose last played day has no published list yet."""
    last = last_played(arm)
    if last is None:
        return
    with db.connect(arm.url) as conn:
        published = conn.execute("select 1 from rec.recommendations where run_date = %s"
                                 " limit 1", (last + timedelta(days=1),)).fetchone()
    if published is None:
        log.info("arm %s: day %s was played but not learned from; running its night",
                 arm.name, last)
        with arm_environment(arm):
            run_started = time.perf_counter()
            run_dag("rec_nightly", last + timedelta(days=1))
            record_timing(arm, last + timedelta(days=1), time.perf_counter() - run_started)


def _run_side_by_side(arms: list[Arm], days: int, spec: WorldSpec) -> None:
    """One `rec demo --arms NAME` process per arm; their output goes to the arm's demo.log."""
    executable = Path(sys.executable).parent / "rec"
    processes = []
    for arm in arms:
        args = [str(executable), "demo", "--days", str(days), "--users", str(spec.users),
                "--experts", str(spec.experts), "--seed", str(spec.seed), "--arms", arm.name]
        out = (arm.home / "demo.log").open("ab")
        processes.append((arm, subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                                env=os.environ | {SIDE_BY_SIDE: "1"})))
        print(f"arm {arm.name}: running in process {processes[-1][1].pid}, log {out.name}")
    failed = [arm.name for arm, process in processes if process.wait() != 0]
    if failed:
        raise RuntimeError(f"arm(s) {', '.join(failed)} failed; see their demo.log")


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
