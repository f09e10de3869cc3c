"""The `rec` command as a user runs it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import psycopg

REC = [sys.executable, "-m", "rec.cli"]


def _rec(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([*REC, *args], env=env, capture_output=True, text=True, check=True,
                          timeout=120)


def test_db_url_prints_the_configured_server(fresh_database):
    env = {**os.environ, "REC_DATABASE_URL": fresh_database}
    assert _rec("db", "url", env=env).stdout.strip() == fresh_database


def test_without_a_url_an_embedded_server_starts_under_rec_home(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if k != "REC_DATABASE_URL"}
    env["REC_HOME"] = str(tmp_path / "home")
    url = _rec("db", "url", env=env).stdout.strip()
    try:
        assert str(tmp_path / "home" / "pgdata") in url
        migrated = _rec("db", "migrate", env=env).stdout
        assert int(re.match(r"applied (\d+) migration", migrated).group(1)) >= 4
        with psycopg.connect(url) as conn:
            versions = conn.execute("select count(*) from public.schema_migrations").fetchone()
        assert versions[0] >= 4
        assert "none pending" in _rec("db", "migrate", env=env).stdout
    finally:
        import pgserver

        pgserver.get_server(tmp_path / "home" / "pgdata", cleanup_mode="delete").cleanup()
