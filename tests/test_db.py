"""Migrations apply in order, once each, and refuse edited history."""

from __future__ import annotations

import psycopg

from rec import db


def test_migrations_create_the_four_schemas_once(fresh_database):
    with psycopg.connect(fresh_database) as conn:
        schemas = {
            r[0]
            for r in conn.execute("select schema_name from information_schema.schemata")
        }
        versions = [r[0] for r in conn.execute(
            "select version from public.schema_migrations order by version")]
    assert {"app", "raw", "analytics", "rec"} <= schemas
    assert versions == sorted(versions) and len(versions) == len(set(versions)) >= 4

    assert db.migrate(fresh_database) == []


def test_url_parts_keep_a_socket_folder_as_host():
    parts = db.url_parts("postgresql://postgres:@/postgres?host=/tmp/pg")
    assert parts["host"] == "/tmp/pg"
    assert parts["dbname"] == "postgres"
    assert parts["user"] == "postgres"


def test_url_parts_read_libpq_key_value_strings():
    parts = db.url_parts("host=127.0.0.1 port=5433 user=root dbname=rec_test")
    assert (parts["host"], parts["port"], parts["user"], parts["dbname"]) == (
        "127.0.0.1", "5433", "root", "rec_test")
