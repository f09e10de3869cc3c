"""The closed-loop experiment: arms that play the same world, and the report that compares them.

Each arm is its own copy of the world (same spec and seed, so day 1 is identical in every
arm) in a database of its own, with its own REC_HOME (Airflow home, models, dbt target)
under the experiment folder. Every day each arm's world plays the day against that arm's
published lists, then `rec_nightly` runs through Airflow for the next date with `REC_ARM`
set to the arm: `rl` publishes the RL champion, `popularity` a popularity ranking and
`myopic` the ranking of the fitted choice model (tonight's click, no long-term aim).

The report reads what happened from the arms' own records: the world's days (visits,
clicks, bookings, revenue, active users), the app's impressions and clicks per visit
(cold-start users, users whose interests jumped) and the Airflow metadata database of each
arm (each task's start and end). It writes `report.md`, PNG plots and `figures.json`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path

import numpy as np
import psycopg
from psycopg.conninfo import conninfo_to_dict

from rec import db
from rec.world.generate import WorldSpec

log = logging.getLogger(__name__)

ARMS = ("rl", "popularity", "myopic")
COLD_START_DAYS = 3
"""A user is cold during their first this many days after signing up."""
PRE_JUMP_DAYS = 7
"""Days before a jump whose visits give the user's pre-jump CTR."""
MAX_RUNS_AFTER_JUMP = 7
RECOVERY_SHARE = 0.9
MIN_VISITS = 30
"""Fewer visits than this in a bucket leave its CTR undefined (too noisy to report)."""
SHIFT_MIN_VISITS = 100
"""The same for the jumped users' buckets, whose CTRs are compared with each other: at a CTR
of 0.3, 100 visits give a standard error of 0.046, about a sixth of the ratio (30 visits give
0.084, and a bucket would clear 0.9 of the pre-jump CTR by chance)."""
ENV_KEYS = ("REC_HOME", "AIRFLOW_HOME", "REC_DATABASE_URL", "REC_ARM",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN")


@dataclass(frozen=True)
class Arm:
    """One arm: a name (the ranking it publishes), its database and its state folders."""

    name: str
    url: str
    home: Path
    """Its REC_HOME: models, dbt target, timings."""
    airflow_home: Path
    """Its Airflow home, with the SQLite metadata database the report reads."""
    ranking: str = "rl"
    """What its nightly runs publish (`REC_ARM`): rl, popularity or myopic."""


def experiment_tag(spec: WorldSpec) -> str:
    """The folder and database suffix of an experiment: its seed and scale."""
    return f"s{spec.seed}_u{spec.users}_e{spec.experts}"


def database_on(server_url: str, dbname: str) -> str:
    """The URL of database `dbname` on the server of `server_url` (`rec.db.on_database`)."""
    return db.on_database(server_url, dbname)


def prepare_arms(server_url: str, folder: Path, spec: WorldSpec, names: list[str],
                 fresh: bool) -> list[Arm]:
    """Create (or, with `fresh`, recreate) each arm's database and home on one server.

    Args:
        server_url: a database on the server that will hold the arms' databases.
        folder: the experiment folder; each arm's home is `folder/arms/<name>`.
        spec: the world every arm plays.
        names: the arms, a subset of ARMS.
        fresh: drop an earlier run's databases of the same tag instead of continuing them.

    Returns:
        The arms, their databases migrated.
    """
    unknown = sorted(set(names) - set(ARMS))
    if unknown or not names:
        raise ValueError(f"unknown arm(s) {unknown or names}; choose from {', '.join(ARMS)}")
    arms = []
    with psycopg.connect(server_url, autocommit=True) as conn:
        for name in names:
            dbname = f"exp_{experiment_tag(spec)}_{name}"
            exists = conn.execute("select 1 from pg_database where datname = %s",
                                  (dbname,)).fetchone()
            if exists and fresh:
                conn.execute(f'drop database "{dbname}" with (force)')
            if not exists or fresh:
                conn.execute(f'create database "{dbname}"')
            home = folder / "arms" / name
            if fresh:
                (home / "airflow" / ".migrated").unlink(missing_ok=True)
                (home / "airflow" / "airflow.db").unlink(missing_ok=True)
            home.mkdir(parents=True, exist_ok=True)
            arm = Arm(name, database_on(server_url, dbname), home, home / "airflow", name)
            db.migrate(arm.url)
            arms.append(arm)
    return arms


@contextmanager
def arm_environment(arm: Arm) -> Iterator[None]:
    """Point REC_HOME, AIRFLOW_HOME, the database and REC_ARM at one arm, then restore."""
    saved = {k: os.environ.get(k) for k in ENV_KEYS}
    os.environ.update({"REC_HOME": str(arm.home), "AIRFLOW_HOME": str(arm.airflow_home),
                       "REC_DATABASE_URL": arm.url, "REC_ARM": arm.ranking})
    # Each arm keeps its own Airflow metadata (SQLite under its home): runs of the same
    # date in two arms must not meet in one database.
    os.environ.pop("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", None)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def record_timing(arm: Arm, run_date: date, seconds: float) -> None:
    """Append one nightly run's wall time (as `rec` saw it) to the arm's timings file."""
    with (arm.home / "nightly_wall_s.jsonl").open("a") as out:
        out.write(json.dumps({"run_date": run_date.isoformat(), "wall_s": seconds}) + "\n")


def _wall_times(arm: Arm) -> dict[str, float]:
    path = arm.home / "nightly_wall_s.jsonl"
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["run_date"]: r["wall_s"] for r in rows}


# --- collecting an arm's figures ------------------------------------------------------------

@dataclass
class ArmData:
    """What one arm's records hold, as arrays."""

    name: str
    days: list[date]
    daily: dict[str, np.ndarray]
    """Per world day: visits, clicks, bookings, revenue, active_users, new_users, ..."""
    visit_user: np.ndarray
    visit_day: np.ndarray
    """Day index (0 = the world's first day) of each visit."""
    visit_age: np.ndarray
    """Days since the user signed up, at the visit."""
    visit_clicked: np.ndarray
    jumps: list[tuple[int, int]]
    """(user_id, day index) of each jump of a user's interests."""
    tasks: list[dict]
    """Each task instance of rec_nightly: run_date, task_id, map_index, seconds."""
    runs: list[dict]
    """Each rec_nightly run: run_date, state, seconds (Airflow), wall_s (as `rec` saw it)."""


def collect(arm: Arm, start: date) -> ArmData:
    """Read one arm's days, visits, jumps and Airflow task durations."""
    with psycopg.connect(arm.url) as conn:
        day_rows = conn.execute("select day, counts from world.days order by day").fetchall()
        visits = conn.execute(
            "select i.user_id, (i.shown_at at time zone 'UTC')::date - %s,"
            " (i.shown_at at time zone 'UTC')::date - (u.signed_up_at at time zone 'UTC')::date,"
            " c.slate_id is not null"
            " from app.impressions i join app.users u using (user_id)"
            " left join (select distinct slate_id from app.events where event_type = 'click') c"
            " using (slate_id) where i.position = 0", (start,)).fetchall()
        jumps = conn.execute("select user_id, day - %s from world.interest_jumps",
                             (start,)).fetchall()
    keys = ("visits", "clicks", "bookings", "revenue", "active_users", "new_users", "jumps",
            "churned")
    daily = {k: np.array([float(c.get(k, 0) or 0) for _, c in day_rows]) for k in keys}
    table = np.array(visits, dtype=np.int64).reshape(-1, 4)
    tasks, runs = _airflow_durations(arm)
    return ArmData(
        name=arm.name, days=[d for d, _ in day_rows], daily=daily,
        visit_user=table[:, 0], visit_day=table[:, 1], visit_age=table[:, 2],
        visit_clicked=table[:, 3].astype(bool), jumps=[(int(u), int(d)) for u, d in jumps],
        tasks=tasks, runs=runs)


def _airflow_durations(arm: Arm) -> tuple[list[dict], list[dict]]:
    """Task and run durations of rec_nightly from the arm's Airflow metadata database."""
    import sqlalchemy

    # Limitation: only the SQLite metadata database under the arm's Airflow home is read
    # (experiment arms always have one); with AIRFLOW__DATABASE__SQL_ALCHEMY_CONN set, the
    # project's own demo reports wall times only.
    path = arm.airflow_home / "airflow.db"
    walls = _wall_times(arm)
    if not path.exists():
        return [], [{"run_date": d, "state": None, "seconds": None, "wall_s": s}
                    for d, s in sorted(walls.items())]
    engine = sqlalchemy.create_engine(f"sqlite:///{path}")
    try:
        with engine.connect() as conn:
            run_rows = conn.execute(sqlalchemy.text(
                "select run_id, logical_date, state from dag_run"
                " where dag_id = 'rec_nightly' order by id")).fetchall()
            task_rows = conn.execute(sqlalchemy.text(
                "select run_id, task_id, map_index, start_date, end_date, state"
                " from task_instance where dag_id = 'rec_nightly'")).fetchall()
    finally:
        engine.dispose()
    # The latest run of each date counts (a date may have been rerun).
    latest = {str(r[1])[:10]: r for r in run_rows}
    run_date_of = {r[0]: d for d, r in latest.items()}
    tasks = [{"run_date": run_date_of[r[0]], "task_id": r[1], "map_index": r[2],
              "seconds": _seconds(r[3], r[4]), "state": r[5],
              "start": r[3], "end": r[4]} for r in task_rows if r[0] in run_date_of]
    runs = []
    for run_date, (_, _, state) in sorted(latest.items()):
        # `dags test` stamps a run's start with its logical date: the run's span is taken
        # from its task instances instead.
        starts = [t["start"] for t in tasks if t["run_date"] == run_date and t["start"]]
        ends = [t["end"] for t in tasks if t["run_date"] == run_date and t["end"]]
        seconds = _seconds(min(map(_timestamp, starts)), max(map(_timestamp, ends))) if (
            starts and ends) else None
        runs.append({"run_date": run_date, "state": state, "seconds": seconds,
                     "wall_s": walls.get(run_date)})
    return tasks, runs


def _timestamp(value) -> datetime:
    return value if isinstance(value, datetime) else datetime.fromisoformat(str(value))


def _seconds(start, end) -> float | None:
    if start is None or end is None:
        return None
    return (_timestamp(end) - _timestamp(start)).total_seconds()


# --- the figures ----------------------------------------------------------------------------

def evaluation_window(n_days: int) -> tuple[int, int]:
    """First and last day index (0-based, inclusive) the uplifts are measured over.

    The second half of the run: days 15 to 30 (1-based) of a 30-day run, day D//2 to D in
    general, so the pipeline has learned from half the run before it is judged.
    """
    return max(n_days // 2 - 1, 0), n_days - 1


def _ratio(numerator: float, denominator: float) -> float | None:
    return None if denominator == 0 else numerator / denominator


def arm_figures(data: ArmData, window: tuple[int, int]) -> dict:
    """One arm's figures over the window: CTR, bookings per day, segments, durations."""
    first, last = window
    days = slice(first, last + 1)
    visits = data.daily["visits"][days].sum()
    in_window = (data.visit_day >= first) & (data.visit_day <= last)
    cold = in_window & (data.visit_age >= 1) & (data.visit_age <= COLD_START_DAYS)
    established = in_window & (data.visit_age > COLD_START_DAYS)
    cold_ctr = _ctr(data.visit_clicked, cold)
    established_ctr = _ctr(data.visit_clicked, established)
    shift = shift_recovery(data, first, last)
    walls = [r["wall_s"] for r in data.runs if r["wall_s"] is not None]
    return {
        "days_in_window": int(min(last, len(data.days) - 1) - first + 1),
        "ctr": _ratio(data.daily["clicks"][days].sum(), visits),
        "bookings_per_day": float(data.daily["bookings"][days].mean())
        if len(data.daily["bookings"][days]) else None,
        "revenue_per_day": float(data.daily["revenue"][days].mean())
        if len(data.daily["revenue"][days]) else None,
        "active_users_last_day": float(data.daily["active_users"][-1])
        if len(data.days) else None,
        "cold_start_visits": int(cold.sum()),
        "cold_start_ctr": cold_ctr,
        "established_ctr": established_ctr,
        "cold_start_ctr_ratio": None if cold_ctr is None or not established_ctr
        else cold_ctr / established_ctr,
        **shift,
        "nightly_run_s": statistics.median(walls) if walls else None,
        "task_median_s": _task_medians(data.tasks),
    }


def _ctr(clicked: np.ndarray, mask: np.ndarray) -> float | None:
    n = int(mask.sum())
    return None if n < MIN_VISITS else float(clicked[mask].mean())


def shift_recovery(data: ArmData, first_day: int, last_day: int | None = None) -> dict:
    """CTR of users whose interests jumped, by nightly runs since the jump, vs before it.

    A jump on day j happens before that day's visits, which are served lists computed
    from the days before it: runs since the jump = visit day - j. Jumps from `first_day`
    to `last_day` count, and visits up to `last_day`; each jumped user's visits in the
    PRE_JUMP_DAYS before the jump give the pooled pre-jump CTR, their visits r days after
    it the CTR at r runs.

    Returns:
        shift_jumps, shift_pre_ctr, shift_ctr_ratio_by_runs (r -> CTR_r / pre-jump CTR, or
        None with under SHIFT_MIN_VISITS visits) and shift_recovery_runs: the first r from
        which the ratio reaches RECOVERY_SHARE and stays there in every later bucket that has
        one (regained and kept, not one lucky bucket), or None if there is no such r within
        the days played.
    """
    last_day = int(data.visit_day.max(initial=0)) if last_day is None else last_day
    jumps = [(u, d) for u, d in data.jumps if first_day <= d <= last_day]
    if not jumps:
        return {"shift_jumps": 0, "shift_pre_ctr": None, "shift_ctr_ratio_by_runs": {},
                "shift_recovery_runs": None}
    order = np.argsort(data.visit_user, kind="stable")
    users_sorted = data.visit_user[order]
    pre_clicks = pre_visits = 0
    post_clicks = np.zeros(MAX_RUNS_AFTER_JUMP + 1)
    post_visits = np.zeros(MAX_RUNS_AFTER_JUMP + 1)
    for user, jump_day in jumps:
        lo, hi = np.searchsorted(users_sorted, [user, user + 1])
        rows = order[lo:hi]
        offset = data.visit_day[rows] - jump_day
        clicked = data.visit_clicked[rows]
        before = (offset < 0) & (offset >= -PRE_JUMP_DAYS)
        pre_clicks += int(clicked[before].sum())
        pre_visits += int(before.sum())
        after = (offset >= 0) & (offset <= MAX_RUNS_AFTER_JUMP) & (
            data.visit_day[rows] <= last_day)
        np.add.at(post_visits, offset[after], 1)
        np.add.at(post_clicks, offset[after], clicked[after])
    pre_ctr = pre_clicks / pre_visits if pre_visits >= SHIFT_MIN_VISITS else None
    ratios = {}
    for r in range(MAX_RUNS_AFTER_JUMP + 1):
        if pre_ctr and post_visits[r] >= SHIFT_MIN_VISITS:
            ratios[r] = float(post_clicks[r] / post_visits[r] / pre_ctr)
        else:
            ratios[r] = None
    measured = [(r, v) for r, v in ratios.items() if v is not None]
    kept = [r for i, (r, _) in enumerate(measured)
            if all(v >= RECOVERY_SHARE for _, v in measured[i:])]
    return {"shift_jumps": len(jumps), "shift_pre_ctr": pre_ctr,
            "shift_ctr_ratio_by_runs": ratios,
            "shift_recovery_runs": kept[0] if kept else None}


def _task_medians(tasks: list[dict]) -> dict[str, float]:
    by_task: dict[str, list[float]] = {}
    for t in tasks:
        if t["seconds"] is not None and t["state"] == "success":
            # Mapped score_shard instances of one run overlap: report one instance's time.
            by_task.setdefault(t["task_id"], []).append(t["seconds"])
    return {k: round(statistics.median(v), 2) for k, v in sorted(by_task.items())}


def headline(per_arm: dict[str, dict]) -> dict:
    """The experiment's figures: uplifts as fractions (0.65 is +65%) and the RL arm's own."""
    def uplift(key: str, control: str) -> float | None:
        rl, other = per_arm.get("rl", {}).get(key), per_arm.get(control, {}).get(key)
        return None if rl is None or not other else rl / other - 1.0

    rl = per_arm.get("rl", {})
    return {
        "ctr_uplift_vs_popularity": uplift("ctr", "popularity"),
        "bookings_uplift_vs_popularity": uplift("bookings_per_day", "popularity"),
        "ctr_uplift_vs_myopic": uplift("ctr", "myopic"),
        "bookings_uplift_vs_myopic": uplift("bookings_per_day", "myopic"),
        "cold_start_ctr_ratio": rl.get("cold_start_ctr_ratio"),
        "shift_recovery_runs": rl.get("shift_recovery_runs"),
        "nightly_run_s": rl.get("nightly_run_s"),
    }


# --- the report -----------------------------------------------------------------------------

def write_report(arms: list[Arm], spec: WorldSpec, folder: Path, n_days: int) -> dict:
    """Collect every arm, write report.md, the plots and figures.json into `folder`.

    Args:
        arms: the arms to compare.
        spec: the world they play (for the start date and the header).
        folder: the experiment folder.
        n_days: the days the experiment is meant to run (the window follows the days
            actually played, so a partial run reports on what it has).

    Returns:
        The figures: the headline keys, `per_arm`, `window_days` (1-based) and `report`.
    """
    started = time.perf_counter()
    data = {arm.name: collect(arm, spec.start_date) for arm in arms}
    played = min(len(d.days) for d in data.values())
    window = evaluation_window(played)
    per_arm = {name: arm_figures(d, window) for name, d in data.items()}
    figures = {
        **headline(per_arm),
        "days_played": played,
        "days_planned": n_days,
        "window_days": [window[0] + 1, window[1] + 1],
        "per_arm": per_arm,
        "report": str(folder / "report.md"),
    }
    folder.mkdir(parents=True, exist_ok=True)
    plots = _plots(data, per_arm, folder)
    (folder / "figures.json").write_text(json.dumps(figures, indent=2, default=str))
    (folder / "report.md").write_text(_markdown(figures, spec, arms, data, plots))
    log.info("experiment report for %d day(s) written to %s in %.1fs", played, folder,
             time.perf_counter() - started)
    return figures


def _plots(data: dict[str, ArmData], per_arm: dict[str, dict], folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(folder / name, dpi=100)
        plt.close(fig)
        written.append(name)

    for key, title, name in (("ctr", "CTR (clicks per visit)", "ctr.png"),
                             ("bookings", "bookings per day", "bookings.png"),
                             ("active_users", "active users (budget left)", "active_users.png")):
        fig, ax = plt.subplots(figsize=(7, 3.5))
        for arm, d in data.items():
            values = (d.daily["clicks"] / np.maximum(d.daily["visits"], 1) if key == "ctr"
                      else d.daily[key])
            ax.plot(range(1, len(values) + 1), values, marker=".", label=arm)
        ax.set_xlabel("day")
        ax.set_title(title)
        ax.legend()
        save(fig, name)

    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = list(per_arm)
    x = np.arange(len(names))
    cold = [per_arm[n]["cold_start_ctr"] or 0 for n in names]
    est = [per_arm[n]["established_ctr"] or 0 for n in names]
    ax.bar(x - 0.2, cold, 0.4, label=f"first {COLD_START_DAYS} days")
    ax.bar(x + 0.2, est, 0.4, label="established")
    ax.set_xticks(x, names)
    ax.set_title("CTR of cold-start and established users (window)")
    ax.legend()
    save(fig, "cold_start.png")

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for n in names:
        ratios = per_arm[n]["shift_ctr_ratio_by_runs"]
        points = [(r, v) for r, v in ratios.items() if v is not None]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=n)
    if ax.get_lines():
        ax.legend()
    ax.axhline(RECOVERY_SHARE, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("nightly runs since the jump")
    ax.set_ylabel("CTR / pre-jump CTR")
    ax.set_title("users whose interests jumped")
    save(fig, "shift_recovery.png")

    tasks = per_arm.get("rl", next(iter(per_arm.values())))["task_median_s"]
    if tasks:
        fig, ax = plt.subplots(figsize=(7, max(3.0, 0.22 * len(tasks))))
        ax.barh(list(tasks), list(tasks.values()))
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=7)
        ax.set_xlabel("median seconds per run")
        ax.set_title("rec_nightly task durations (RL arm)" if "rl" in per_arm
                     else "rec_nightly task durations")
        save(fig, "task_durations.png")
    return written


def _fmt(value, kind: str = "f") -> str:
    if value is None:
        return "n/a"
    if kind == "%":
        return f"{value:+.1%}"
    if kind == "d":
        return f"{value:,.0f}"
    return f"{value:.3f}"


def _markdown(figures: dict, spec: WorldSpec, arms: list[Arm], data: dict[str, ArmData],
              plots: list[str]) -> str:
    per_arm = figures["per_arm"]
    first, last = figures["window_days"]
    lines = [
        f"# Closed-loop experiment: {spec.users:,} users, {spec.experts} experts, seed "
        f"{spec.seed}",
        "",
        f"{figures['days_played']} of {figures['days_planned']} day(s) played from "
        f"{spec.start_date}. Figures over days {first} to {last} (the second half of the days "
        "played), pooled over the window. Arms: " + ", ".join(a.name for a in arms) + ".",
        "",
        "## Headline",
        "",
        "| figure | value |",
        "|---|---|",
        f"| CTR uplift vs popularity | {_fmt(figures['ctr_uplift_vs_popularity'], '%')} |",
        "| bookings/day uplift vs popularity | "
        f"{_fmt(figures['bookings_uplift_vs_popularity'], '%')} |",
        f"| CTR uplift vs myopic | {_fmt(figures['ctr_uplift_vs_myopic'], '%')} |",
        f"| bookings/day uplift vs myopic | {_fmt(figures['bookings_uplift_vs_myopic'], '%')} |",
        f"| cold-start CTR / established CTR (RL) | {_fmt(figures['cold_start_ctr_ratio'])} |",
        "| nightly runs until shifted users regain "
        f"{RECOVERY_SHARE:.0%} of pre-jump CTR (RL) | "
        f"{'not within the days played' if figures['shift_recovery_runs'] is None else figures['shift_recovery_runs']} |",  # noqa: E501
        f"| median rec_nightly wall seconds (RL) | {_fmt(figures['nightly_run_s'])} |",
        "",
        "## Per arm",
        "",
        "| arm | CTR | bookings/day | revenue/day | active users (last day) | cold CTR "
        "| established CTR | cold/established | jumps | pre-jump CTR | recovery runs "
        "| median nightly s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, f in per_arm.items():
        lines.append(
            f"| {name} | {_fmt(f['ctr'])} | {_fmt(f['bookings_per_day'], 'd')} "
            f"| {_fmt(f['revenue_per_day'], 'd')} | {_fmt(f['active_users_last_day'], 'd')} "
            f"| {_fmt(f['cold_start_ctr'])} | {_fmt(f['established_ctr'])} "
            f"| {_fmt(f['cold_start_ctr_ratio'])} | {f['shift_jumps']} "
            f"| {_fmt(f['shift_pre_ctr'])} | {f['shift_recovery_runs']} "
            f"| {_fmt(f['nightly_run_s'])} |")
    lines += ["", "## Days", ""]
    names = list(data)
    lines.append("| day | " + " | ".join(f"{n} CTR | {n} bookings | {n} active"
                                          for n in names) + " |")
    lines.append("|---|" + "---|---|---|" * len(names))
    for i, day in enumerate(data[names[0]].days):
        cells = []
        for n in names:
            d = data[n].daily
            if i < len(d["visits"]):
                cells.append(f"{d['clicks'][i] / max(d['visits'][i], 1):.3f} "
                             f"| {d['bookings'][i]:.0f} | {d['active_users'][i]:.0f}")
            else:
                cells.append("| |")
        lines.append(f"| {day} | " + " | ".join(cells) + " |")
    lines += ["", "## Shifted interests: CTR / pre-jump CTR by nightly runs since the jump", "",
              "| arm | " + " | ".join(str(r) for r in range(MAX_RUNS_AFTER_JUMP + 1)) + " |",
              "|---|" + "---|" * (MAX_RUNS_AFTER_JUMP + 1)]
    for name, f in per_arm.items():
        lines.append(f"| {name} | " + " | ".join(
            _fmt(v) for v in f["shift_ctr_ratio_by_runs"].values()) + " |")
    lines += ["", "## rec_nightly task durations (median seconds per run, from Airflow)", "",
              "| task | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    all_tasks = sorted({t for f in per_arm.values() for t in f["task_median_s"]})
    for task_id in all_tasks:
        lines.append(f"| {task_id} | " + " | ".join(
            _fmt(per_arm[n]["task_median_s"].get(task_id)) for n in names) + " |")
    lines += ["", "Runs (Airflow's start to end, and the wall time `rec` measured around "
              "`airflow dags test`):", "", "| arm | run date | state | airflow s | wall s |",
              "|---|---|---|---|---|"]
    for name, d in data.items():
        for r in d.runs:
            lines.append(f"| {name} | {r['run_date']} | {r['state']} | {_fmt(r['seconds'])} "
                         f"| {_fmt(r['wall_s'])} |")
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    lines += ["", "## How to read it", "",
              "- CTR is clicks per visit (a visit shows one slate of 10; a user clicks at most "
              "one service). Bookings per day is the mean over the window.",
              f"- Cold-start users are visits in a user's first {COLD_START_DAYS} days after "
              "signing up (they first visit the day after); established users are all older "
              "visits.",
              "- A jump gives a user's strongest interest to another topic and the old "
              "favourite the other topic's (small) share; the shape of their interests is "
              "kept, so a ranking that follows the jump can match the CTR before it. "
              "Visits on the day of the jump are served lists computed before it (0 runs); "
              f"recovery is the first number of runs from which their pooled CTR reaches "
              f"{RECOVERY_SHARE:.0%} of their CTR in the {PRE_JUMP_DAYS} days before and stays "
              f"there in every later bucket. Buckets with under {MIN_VISITS} visits "
              f"({SHIFT_MIN_VISITS} for the jumped users) show n/a.",
              "- Active users are users with days of interest left; empty visits spend that "
              "budget, well-rated sessions add to it, and users at zero churn.",
              "", "## Where the arms live", ""]
    for arm in arms:
        lines.append(f"- `{arm.name}`: database `{conninfo_to_dict(arm.url).get('dbname')}`, "
                     f"home `{arm.home}`. Open its Airflow UI with `REC_HOME={arm.home} "
                     f"REC_DATABASE_URL='{arm.url}' .venv/bin/rec airflow standalone`.")
    return "\n".join(lines) + "\n"


def safe_name(text: str) -> str:
    """A folder-safe version of `text`."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def last_played(arm: Arm) -> date | None:
    """The last world day this arm has played."""
    with psycopg.connect(arm.url) as conn:
        exists = conn.execute("select to_regclass('world.days')").fetchone()[0]
        if exists is None:
            return None
        return conn.execute("select max(day) from world.days").fetchone()[0]


def days_played(arm: Arm, start: date) -> int:
    last = last_played(arm)
    return 0 if last is None else (last - start).days + 1


def next_day(arm: Arm, start: date) -> date:
    return start + timedelta(days=days_played(arm, start))
