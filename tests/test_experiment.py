"""The experiment's arms are identical copies of the world, and its figures mean what they say."""

from __future__ import annotations

import json
import os
from datetime import date

import numpy as np
import psycopg
import pytest

from rec.experiment import (
    ArmData,
    arm_environment,
    evaluation_window,
    headline,
    prepare_arms,
    shift_recovery,
    write_report,
)
from rec.world.generate import WorldSpec, seed_world
from rec.world.traffic import simulate_day

HEADLINE_KEYS = ("ctr_uplift_vs_popularity", "bookings_uplift_vs_popularity",
                 "bookings_uplift_vs_myopic", "cold_start_ctr_ratio", "shift_recovery_runs",
                 "nightly_run_s")


def test_the_window_is_the_second_half():
    assert evaluation_window(30) == (14, 29)  # days 15 to 30, 1-based
    assert evaluation_window(8) == (3, 7)
    assert evaluation_window(1) == (0, 0)


def _visits(rows: list[tuple[int, int, int, bool]]) -> ArmData:
    table = np.array(rows, dtype=np.int64)
    return ArmData(name="rl", days=[], daily={}, visit_user=table[:, 0],
                   visit_day=table[:, 1], visit_age=table[:, 2],
                   visit_clicked=table[:, 3].astype(bool), jumps=[], tasks=[], runs=[])


def _jumped(rng: np.random.Generator, users: int, jump_day: int, after: dict[int, float],
            bystanders: bool = False) -> ArmData:
    """Users 0..users-1 jump on jump_day: CTR 0.5 in the week before, after[r] r runs later;
    with bystanders, as many users who never jumped click on the day after."""
    rows = []
    for user in range(users):
        for day in range(jump_day - 7, jump_day):
            rows.append((user, day, 100, rng.random() < 0.5))
        for runs, ctr in after.items():
            rows.append((user, jump_day + runs, 100, rng.random() < ctr))
        if bystanders:
            rows.append((user + users, jump_day + 1, 100, True))
    data = _visits(rows)
    data.jumps = [(u, jump_day) for u in range(users)]
    return data


def test_shift_recovery_counts_runs_until_ctr_is_back():
    rng = np.random.default_rng(0)
    jump_day, users = 10, 400
    # Pre-jump CTR 0.5; after the jump 0.1, 0.3, 0.47, 0.5 at 0, 1, 2, 3 runs.
    data = _jumped(rng, users, jump_day, {0: 0.1, 1: 0.3, 2: 0.47, 3: 0.5}, bystanders=True)

    result = shift_recovery(data, first_day=0)

    assert result["shift_jumps"] == users
    assert result["shift_pre_ctr"] == pytest.approx(0.5, abs=0.03)
    ratios = result["shift_ctr_ratio_by_runs"]
    assert ratios[0] == pytest.approx(0.2, abs=0.06)
    assert ratios[4] is None  # no visits there
    assert result["shift_recovery_runs"] == 2
    # Jumps before the window's first day do not count.
    assert shift_recovery(data, first_day=jump_day + 1)["shift_jumps"] == 0


def test_shift_recovery_needs_the_ctr_kept_and_enough_visits():
    rng = np.random.default_rng(1)

    def jumped(users: int, after: dict[int, float]) -> dict:
        return shift_recovery(_jumped(rng, users, 10, after), first_day=0)

    # Back at once, lost again the next night, regained for good two nights later.
    result = jumped(400, {0: 0.5, 1: 0.2, 2: 0.3, 3: 0.48, 4: 0.5})
    assert result["shift_ctr_ratio_by_runs"][0] >= 0.9
    assert result["shift_recovery_runs"] == 3
    # 80 jumped users: every bucket is too small to be read, so nothing is claimed.
    small = jumped(80, {0: 0.5, 1: 0.5, 2: 0.5})
    assert set(small["shift_ctr_ratio_by_runs"].values()) == {None}
    assert small["shift_recovery_runs"] is None


def test_uplifts_are_fractions_of_the_control_arm():
    per_arm = {"rl": {"ctr": 0.33, "bookings_per_day": 128.0, "cold_start_ctr_ratio": 0.85,
                      "shift_recovery_runs": 2, "nightly_run_s": 90.0},
               "popularity": {"ctr": 0.2, "bookings_per_day": 100.0},
               "myopic": {"ctr": 0.3, "bookings_per_day": 160.0}}
    figures = headline(per_arm)
    assert figures["ctr_uplift_vs_popularity"] == pytest.approx(0.65)
    assert figures["bookings_uplift_vs_popularity"] == pytest.approx(0.28)
    assert figures["bookings_uplift_vs_myopic"] == pytest.approx(-0.2)
    assert headline({"rl": per_arm["rl"]})["ctr_uplift_vs_popularity"] is None


def test_arms_start_from_the_same_world_in_databases_of_their_own(server_url, tmp_path):
    spec = WorldSpec(users=250, experts=12, seed=3)
    before = {k: os.environ.get(k) for k in ("REC_HOME", "REC_DATABASE_URL", "REC_ARM")}
    arms = prepare_arms(server_url, tmp_path, spec, ["rl", "popularity", "myopic"], fresh=True)
    try:
        assert len({a.url for a in arms}) == 3
        days = []
        for arm in arms:
            with arm_environment(arm):
                assert os.environ["REC_ARM"] == arm.name
                assert os.environ["REC_DATABASE_URL"] == arm.url
                assert os.environ["AIRFLOW_HOME"] == str(tmp_path / "arms" / arm.name / "airflow")
                with psycopg.connect(arm.url) as conn:
                    seed_world(conn, spec)
                    days.append([simulate_day(conn, date(2026, 1, 1 + d)) for d in range(2)])
                    conn.commit()
        assert {k: os.environ.get(k) for k in before} == before
        assert days[0] == days[1] == days[2]
        assert days[0][0]["visits"] > 0

        with pytest.raises(ValueError, match="unknown arm"):
            prepare_arms(server_url, tmp_path, spec, ["rl", "bandit"], fresh=False)

        figures = write_report(arms, spec, tmp_path, n_days=2)
        assert set(HEADLINE_KEYS) <= set(figures)
        # Identical worlds, no nightly runs yet: no arm is ahead of another.
        assert figures["ctr_uplift_vs_popularity"] == pytest.approx(0.0)
        assert figures["bookings_uplift_vs_myopic"] == pytest.approx(0.0)
        assert figures["window_days"] == [1, 2]
        report = (tmp_path / "report.md").read_text()
        assert "| rl |" in report and "| myopic |" in report
        for plot in ("ctr.png", "bookings.png", "active_users.png", "cold_start.png",
                     "shift_recovery.png"):
            assert (tmp_path / plot).read_bytes()[:4] == b"\x89PNG"
        assert json.loads((tmp_path / "figures.json").read_text())["days_played"] == 2
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            for arm in arms:
                name = psycopg.conninfo.conninfo_to_dict(arm.url)["dbname"]
                conn.execute(f'drop database if exists "{name}" with (force)')
