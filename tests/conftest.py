"""Fixtures: a real PostgreSQL for every test that needs one.

`REC_TEST_DATABASE_URL` points at a server to use (a fresh database is created
on it for the session and dropped afterwards); unset, an embedded server is
started in a temporary folder.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from rec import db

# Airflow reads its configuration once, on import: give the test session a home of its own.
_SESSION_HOME = Path(tempfile.mkdtemp(prefix="rec-tests-"))
os.environ["REC_HOME"] = str(_SESSION_HOME)
os.environ["AIRFLOW_HOME"] = str(_SESSION_HOME / "airflow")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"


def _server_url(tmp_root: Path) -> str:
    url = os.environ.get("REC_TEST_DATABASE_URL")
    if url:
        return url
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR")
        import pgserver

    keep = os.environ.get("REC_TEST_KEEP_PGDATA") == "1"
    server = pgserver.get_server(tmp_root / "pgdata", cleanup_mode="stop" if keep else "delete")
    return server.get_uri()


@pytest.fixture(scope="session")
def server_url() -> str:
    # Not under pytest's numbered temp folders: a concurrent pytest session prunes those,
    # which would pull the data folder from under a running server.
    return _server_url(Path(tempfile.mkdtemp(prefix="rec-tests-pg-")))


@pytest.fixture(scope="session")
def rec_home() -> Path:
    return _SESSION_HOME


@pytest.fixture()
def fresh_database(server_url, rec_home):
    """A new, migrated database for one test; dropped when the test ends."""
    with db.scratch_database("rec_test", server_url) as url:
        previous = os.environ.get("REC_DATABASE_URL")
        os.environ["REC_DATABASE_URL"] = url
        try:
            yield url
        finally:
            if previous is None:
                os.environ.pop("REC_DATABASE_URL", None)
            else:
                os.environ["REC_DATABASE_URL"] = previous
