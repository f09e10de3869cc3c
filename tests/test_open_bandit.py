"""The Open Bandit Dataset sample: ingest with quarantine on a real Postgres, the choice
model against the position-only baseline, and BTS's CTR estimated off-line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import psycopg
import pytest

from rec.cli import main
from rec.ingest.open_bandit import ingest_open_bandit, load_campaign
from rec.ingest.open_bandit_files import read_campaign

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "open-bandit"
pytestmark = pytest.mark.skipif(not (DATA / "random" / "men" / "men.csv").exists(),
                                reason="the Open Bandit sample is not in ../shared/data")


def test_ope_on_men_covers_the_observed_bts_ctr(capsys):
    code = main(["ope", "open-bandit", "--random", str(DATA / "random"), "--bts",
                 str(DATA / "bts"), "--campaign", "men", "--json"])
    result = json.loads(capsys.readouterr().out)

    assert code == 0
    assert result["observed_ctr"] == pytest.approx(69 / 10_000)
    assert set(result["estimators"]) == {"ips", "snips", "dr"}
    for name, estimate in result["estimators"].items():
        low, high = estimate["ci"]
        assert low <= result["observed_ctr"] <= high, (name, estimate)
        assert estimate["relative_error"] == pytest.approx(
            abs(estimate["estimate"] - result["observed_ctr"]) / result["observed_ctr"])
    model = result["choice_model"]
    assert model["heldout_logloss"] <= model["baseline_logloss"]
    assert len(model["calibration"]) == 10
    assert sum(d["n"] for d in model["calibration"]) == 10_000


def _campaign_copy(tmp_path: Path, rows: int) -> Path:
    """The first `rows` impressions of random/men plus three malformed rows."""
    folder = tmp_path / "random" / "men"
    folder.mkdir(parents=True)
    shutil.copy(DATA / "random" / "men" / "item_context.csv", folder)
    lines = (DATA / "random" / "men" / "men.csv").read_text().splitlines()[: rows + 1]
    good = lines[1].split(",")
    bad_position = [str(rows), *good[1:3], "x", *good[4:]]
    unknown_item = [str(rows + 1), good[1], "99", *good[3:]]
    short = good[:10]
    lines += [",".join(bad_position), ",".join(unknown_item), ",".join(short)]
    (folder / "men.csv").write_text("\n".join(lines) + "\n")
    return folder


def test_ingest_accounts_for_every_row_and_quarantines_malformed_ones(tmp_path, fresh_database):
    folder = _campaign_copy(tmp_path, rows=1500)

    summary = ingest_open_bandit(folder, url=fresh_database)

    load = summary["load"]
    assert load["rows_read"] == 1503 + 34
    assert load["rows_quarantined"] == 3
    assert load["rows_read"] == load["rows_accepted"] + load["rows_quarantined"]
    with psycopg.connect(fresh_database) as conn:
        accounting = conn.execute(
            "select source_file, rows_read, rows_accepted, rows_quarantined"
            " from ingest.open_bandit_loads order by source_file").fetchall()
        reasons = conn.execute(
            "select line_number, reason, row_data->>'item_id' from ingest.open_bandit_quarantine"
            " order by line_number").fetchall()
        impressions = conn.execute("select count(*), min(position), max(position)"
                                   " from app.impressions").fetchone()
        clicks = conn.execute("select count(*) from app.events where event_type = 'click'"
                              ).fetchone()[0]
        marts = conn.execute("select count(*) from analytics.choice_training_slates"
                             ).fetchone()[0]
    assert accounting == [("item_context.csv", 34, 34, 0), ("men.csv", 1503, 1500, 3)]
    assert reasons == [(1502, "position not a positive integer", good_item(folder)),
                       (1503, "item_id not in item_context", "99"),
                       (1504, "wrong number of fields (10, expected 44)", good_item(folder))]
    assert impressions == (1500, 0, 2)
    assert clicks == 9
    assert marts == 1500
    assert list(summary["extract"]) == ["2019-11-24"]
    assert summary["extract"]["2019-11-24"]["impressions"]["accepted"] == 1500
    assert all(s["success"] for s in summary["data_checks"].values())

    # Loading the same folder again replaces the earlier load instead of adding to it.
    again = load_campaign(read_campaign(folder), "rerun", fresh_database)
    with psycopg.connect(fresh_database) as conn:
        counts = conn.execute("select (select count(*) from app.impressions),"
                              " (select count(*) from app.users),"
                              " (select count(*) from ingest.open_bandit_quarantine)").fetchone()
    assert counts == (1500, load["users"], 3) and again["users"] == load["users"]


def good_item(folder: Path) -> str:
    return (folder / "men.csv").read_text().splitlines()[1].split(",")[2]
