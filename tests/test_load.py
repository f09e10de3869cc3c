"""Readers under load: users' lists stay whole while a publish of 100,000 users runs."""

from __future__ import annotations

import random
import threading
import time
from datetime import date

import numpy as np
import psycopg
import test_publish

from rec import publish

USERS = 100_000
READERS = 8
LIST_QUERY = (
    "select run_date, count(*), count(distinct rank), min(model_version), max(model_version)"
    " from rec.recommendations"
    " where run_date = (select max(run_date) from rec.recommendations) and user_id = %s"
    " group by run_date"
)


def test_eight_readers_never_see_a_partial_or_missing_list(fresh_database):
    policy, users, items = test_publish._policy_world(USERS, 300)
    ranked = publish.rank_users(policy, users, items, 20, 0.1, seed=2)
    test_publish._publish(fresh_database, date(2026, 4, 1), ranked, items, "v1")

    latencies: list[float] = []
    problems: list[str] = []
    stop = threading.Event()

    def read(seed: int) -> None:
        rng = random.Random(seed)
        with psycopg.connect(fresh_database, autocommit=True) as conn:
            while not stop.is_set():
                user = rng.randint(1, USERS)
                started = time.perf_counter()
                try:
                    row = conn.execute(LIST_QUERY, (user,)).fetchone()
                except psycopg.Error as error:
                    problems.append(f"user {user}: {error}")
                    continue
                latencies.append(time.perf_counter() - started)
                if row is None or row[1:3] != (20, 20) or row[3] != row[4]:
                    problems.append(f"user {user}: {row}")

    threads = [threading.Thread(target=read, args=(s,)) for s in range(READERS)]
    for thread in threads:
        thread.start()
    try:
        test_publish._publish(fresh_database, date(2026, 4, 1), ranked, items, "v2")
        test_publish._publish(fresh_database, date(2026, 4, 2), ranked, items, "v3")
    finally:
        stop.set()
        for thread in threads:
            thread.join()

    p50, p99 = np.percentile(np.array(latencies) * 1000, [50, 99])
    print(f"\n{len(latencies)} reads by {READERS} readers during a publish of {USERS} users:"
          f" {len(problems)} errors or partial lists, p50 {p50:.2f} ms, p99 {p99:.2f} ms")
    assert problems == []
    assert len(latencies) > READERS * 10
