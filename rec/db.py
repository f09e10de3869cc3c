"""Database access: which server to use, connections, migrations and bulk copy.

`REC_DATABASE_URL` selects a server. Unset, an embedded PostgreSQL (the
`pgserver` wheel) is started under `REC_HOME/pgdata` and left running for the
next command, so a fresh machine needs nothing but Python.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import uuid
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from importlib import resources

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from rec.config import rec_home

log = logging.getLogger(__name__)

MIGRATIONS_PACKAGE = "rec.migrations"


def embedded_url() -> str:
    """Start (or reuse) the embedded server under REC_HOME and return its URL."""
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI); pgserver then
        # falls back to /tmp, which is what we want.
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR")
        import pgserver

    logging.getLogger("pgserver").setLevel(logging.WARNING)
    pgdata = rec_home() / "pgdata"
    server = pgserver.get_server(pgdata, cleanup_mode=None)
    return server.get_uri()


def database_url() -> str:
    """The URL of the database the pipeline reads and writes."""
    url = os.environ.get("REC_DATABASE_URL")
    if url:
        return url
    url = embedded_url()
    os.environ["REC_DATABASE_URL"] = url
    return url


def url_parts(url: str) -> dict[str, str]:
    """host, port, user, password and dbname of a URL or a libpq `key=value` string.

    A Unix-socket folder (`?host=/path`) stays in `host`, as libpq reads it.
    """
    given = {k: str(v) for k, v in conninfo_to_dict(url).items() if v is not None}
    return {
        "host": given.get("host", "localhost"),
        "port": given.get("port", "5432"),
        "user": given.get("user", "postgres"),
        "password": given.get("password", ""),
        "dbname": given.get("dbname", "postgres"),
    }


def on_database(url: str, dbname: str) -> str:
    """The URL of database `dbname` on the server of `url` (a URL or `key=value` string)."""
    parts = {k: v for k, v in conninfo_to_dict(url).items() if v is not None}
    parts["dbname"] = dbname
    return make_conninfo(**parts)


@contextmanager
def scratch_database(prefix: str, server_url: str | None = None) -> Iterator[str]:
    """A new, migrated database with a unique name on the server; dropped on exit.

    Yields its URL. For tests and benchmarks that must not touch the pipeline's database.
    """
    server_url = server_url or database_url()
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'create database "{name}"')
    try:
        url = on_database(server_url, name)
        migrate(url)
        yield url
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(f'drop database if exists "{name}" with (force)')


def connect(url: str | None = None, **kwargs) -> psycopg.Connection:
    return psycopg.connect(url or database_url(), **kwargs)


@contextmanager
def transaction(url: str | None = None) -> Iterator[psycopg.Connection]:
    """A connection whose work commits on success and rolls back on any error."""
    with connect(url) as conn:
        with conn.transaction():
            yield conn


def copy_rows(
    conn: psycopg.Connection, table: str, columns: Sequence[str], rows: Iterable[Sequence]
) -> int:
    """Stream rows into `table` with COPY; returns the number written."""
    count = 0
    column_list = ", ".join(columns)
    with conn.cursor() as cur:
        with cur.copy(f"copy {table} ({column_list}) from stdin") as copy:
            for row in rows:
                copy.write_row(row)
                count += 1
    return count


def _migration_files() -> list[tuple[str, str, str]]:
    """(version, name, sql) of every migration, in version order."""
    found = []
    for entry in resources.files(MIGRATIONS_PACKAGE).iterdir():
        if entry.name.endswith(".sql"):
            version, _, rest = entry.name.partition("_")
            found.append((version, rest.removesuffix(".sql"), entry.read_text()))
    return sorted(found)


def migrate(url: str | None = None) -> list[str]:
    """Apply the migrations not yet recorded, each in its own transaction.

    Returns the versions applied. A migration whose file changed after it was
    applied is an error: history is never rewritten silently.
    """
    applied_now = []
    with connect(url) as conn:
        conn.execute(
            "create table if not exists public.schema_migrations ("
            " version text primary key, name text not null, checksum text not null,"
            " applied_at timestamptz not null default now())"
        )
        conn.commit()
        for version, name, sql in _migration_files():
            checksum = hashlib.sha256(sql.encode()).hexdigest()
            with conn.transaction():
                # One migrator at a time: two nightly runs may start together.
                conn.execute("select pg_advisory_xact_lock(hashtext('rec.migrate'))")
                row = conn.execute(
                    "select checksum from public.schema_migrations where version = %s",
                    (version,),
                ).fetchone()
                if row is not None:
                    if row[0] != checksum:
                        raise RuntimeError(
                            f"migration {version}_{name} changed after it was applied; "
                            "add a new migration instead of editing an applied one"
                        )
                    continue
                started = time.perf_counter()
                conn.execute(sql)
                conn.execute(
                    "insert into public.schema_migrations (version, name, checksum)"
                    " values (%s, %s, %s)",
                    (version, name, checksum),
                )
                log.info("applied migration %s_%s in %.2fs", version, name,
                         time.perf_counter() - started)
                applied_now.append(version)
    return applied_now
