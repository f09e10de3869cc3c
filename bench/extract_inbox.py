"""What checking raw client text costs: inbox extraction against typed-table extraction.

    python bench/extract_inbox.py --rows 200000 --bad-share 0.1

Lands the same clicks twice in a scratch database: once as typed rows in `app.events` (day
A) and once as text in `app.event_inbox` (day B), a share of the inbox rows spoiled in
several ways (malformed ids and timestamps, broken or oversized JSON, control characters,
duplicates). Then times `rec.extract.extract_day` on each day, in this run and on this
machine: the typed day is the baseline, and inbox_over_typed is the inbox day's time over
it. Every extraction is checked to account for all its rows.

Uses REC_DATABASE_URL if set, else the embedded server; the scratch database is dropped at
the end. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import random
import time
import uuid
from datetime import UTC, datetime, timedelta

import psycopg

from rec import db
from rec.extract import extract_day
from rec.world.generate import WorldSpec, seed_world

TYPED_DAY = datetime(2026, 1, 1, tzinfo=UTC)
INBOX_DAY = datetime(2026, 1, 2, tzinfo=UTC)


def _spoil(row: list, rng: random.Random, first_id: int) -> list:
    """One of a few kinds of damage to an inbox row (columns as in `_inbox_rows`)."""
    kind = rng.randrange(6)
    if kind == 0:
        row[1] = "id-" + row[1]
    elif kind == 1:
        row[6] = "yesterday"
    elif kind == 2:
        row[7] = row[7][:-3]
    elif kind == 3:
        row[7] = json.dumps({"query": "x" * 20_000})
    elif kind == 4:
        row[7] = json.dumps({"query": "bell\x07"})
    else:
        row[1] = str(first_id)
    return row


def _inbox_rows(clicks: list[tuple], bad_share: float, seed: int):
    rng = random.Random(seed)
    first_id = 10**12
    for i, (user, service, slate, moment) in enumerate(clicks):
        at = moment + timedelta(days=1)
        row = [at, str(first_id + i), "click", str(user), str(service), str(slate),
               at.isoformat(), json.dumps({"query": f"topic {i % 97}"})]
        yield _spoil(row, rng, first_id) if i and rng.random() < bad_share else row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--bad-share", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with db.scratch_database("rec_bench_inbox") as url:
        rng = random.Random(args.seed)
        with psycopg.connect(url) as conn:
            seed_world(conn, WorldSpec(users=1000, experts=20, seed=args.seed))
            users = [r[0] for r in conn.execute("select user_id from app.users")]
            services = [r[0] for r in conn.execute("select service_id from app.services")]
            clicks = [(rng.choice(users), rng.choice(services), uuid.UUID(int=i + 1),
                       TYPED_DAY + timedelta(seconds=rng.randrange(86_400)))
                      for i in range(args.rows)]
            db.copy_rows(conn, "app.events",
                         ("event_type", "user_id", "service_id", "slate_id", "occurred_at"),
                         (("click", *c) for c in clicks))
            db.copy_rows(conn, "app.event_inbox",
                         ("received_at", "event_id", "event_type", "user_id", "service_id",
                          "slate_id", "occurred_at", "payload"),
                         _inbox_rows(clicks, args.bad_share, args.seed))
            conn.execute("analyze")
            conn.commit()

        started = time.perf_counter()
        typed = extract_day(TYPED_DAY, INBOX_DAY, "bench-typed", url)["events"]
        typed_seconds = time.perf_counter() - started
        started = time.perf_counter()
        inbox = extract_day(INBOX_DAY, INBOX_DAY + timedelta(days=1), "bench-inbox",
                            url)["event_inbox"]
        inbox_seconds = time.perf_counter() - started

    for counts in (typed, inbox):
        assert counts["read"] == args.rows == counts["accepted"] + counts["quarantined"]
    print(f"typed: {typed['read']} rows in {typed_seconds:.2f} s"
          f" ({typed['read'] / typed_seconds:,.0f} rows/s)")
    print(f"inbox: {inbox['read']} rows in {inbox_seconds:.2f} s"
          f" ({inbox['read'] / inbox_seconds:,.0f} rows/s),"
          f" {inbox['quarantined']} quarantined")
    print(json.dumps({
        "rows": args.rows, "bad_share": args.bad_share,
        "typed_seconds": round(typed_seconds, 3), "inbox_seconds": round(inbox_seconds, 3),
        "inbox_quarantined": inbox["quarantined"],
        "inbox_over_typed": round(inbox_seconds / typed_seconds, 2),
    }))


if __name__ == "__main__":
    main()
