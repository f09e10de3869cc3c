"""Publishing: exact exploration draws, atomic partition swaps, retention and the analyst role."""

from __future__ import annotations

import threading
from datetime import UTC, date, datetime

import numpy as np
import psycopg
import pytest
import torch

from rec import publish
from rec.features import Items, Users
from rec.policy import (
    TwoTowerPolicy,
    item_feature_matrix,
    top_n_for_policy,
    top_n_with_exploration,
    user_feature_matrix,
)

N_TOPICS = 6


def _reference_draws(scores: torch.Tensor, n: int, exploration: float,
                     generator: torch.Generator) -> torch.Tensor:
    """The slot-by-slot procedure with a full softmax per slot (the definition)."""
    remaining = scores.clone()
    rows = torch.arange(len(scores))
    chosen = torch.empty(len(scores), n, dtype=torch.long)
    for slot in range(n):
        sampled = torch.multinomial(torch.softmax(remaining, 1), 1, generator=generator)[:, 0]
        explore = torch.rand(len(scores), generator=generator) < exploration
        chosen[:, slot] = torch.where(explore, sampled, remaining.argmax(1))
        remaining[rows, chosen[:, slot]] = float("-inf")
    return chosen


def _expected_propensity(scores: torch.Tensor, chosen: torch.Tensor,
                         exploration: float) -> torch.Tensor:
    remaining = scores.double().clone()
    rows = torch.arange(len(scores))
    expected = torch.empty(chosen.shape, dtype=torch.float64)
    for slot in range(chosen.shape[1]):
        item = chosen[:, slot]
        greedy = (remaining.argmax(1) == item).double()
        expected[:, slot] = ((1 - exploration) * greedy
                             + exploration * torch.softmax(remaining, 1)[rows, item])
        remaining[rows, item] = float("-inf")
    return expected


@pytest.mark.parametrize("n_items", [23, 400])
def test_draws_and_propensities_match_the_slot_by_slot_definition(n_items):
    generator = torch.Generator().manual_seed(1)
    one_user = 1.5 * torch.randn(1, n_items, generator=generator)
    scores = one_user.expand(20_000, n_items).contiguous()
    n, exploration = 6, 0.4

    chosen, propensity = top_n_with_exploration(scores, n, exploration, generator)
    reference = _reference_draws(scores, n, exploration, generator)

    assert all(len(set(row)) == n for row in chosen[:500].tolist())
    torch.testing.assert_close(propensity.double(),
                               _expected_propensity(scores, chosen, exploration),
                               rtol=1e-4, atol=1e-7)
    # Compare where the draws land: the 5 best services one by one, then 3 bands of the rest.
    rank_of = torch.empty(n_items, dtype=torch.long)
    rank_of[one_user[0].argsort(descending=True)] = torch.arange(n_items)
    band = torch.bucketize(rank_of, torch.tensor([1, 2, 3, 4, 5, 10, 20]))
    for slot in range(n):
        ours = torch.bincount(band[chosen[:, slot]], minlength=8).double() / len(scores)
        theirs = torch.bincount(band[reference[:, slot]], minlength=8).double() / len(scores)
        assert 0.5 * (ours - theirs).abs().sum() < 0.04, slot


def _policy_world(users: int, services: int, seed: int = 0):
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    policy = TwoTowerPolicy(N_TOPICS, 4).eval()
    topic = torch.randint(0, N_TOPICS, (services,), generator=generator)
    numeric = torch.randn(services, 4, generator=generator)
    interest = torch.softmax(torch.randn(users, N_TOPICS, generator=generator), 1)
    cold = torch.rand(users, generator=generator) < 0.2
    interest[cold] = 0.0
    user_set = Users(np.arange(1, users + 1, dtype=np.int64), interest,
                     torch.where(cold, 0.0, 1.0), (interest > 0.3).float(), cold)
    items = Items(np.arange(100, 100 + services, dtype=np.int64),
                  np.arange(services, dtype=np.int64) % 37 + 1, topic, numeric,
                  torch.zeros(services), torch.zeros(services))
    return policy, user_set, items


def test_policy_lists_are_exact_and_explore_the_configured_share():
    policy, users, items = _policy_world(3000, 700)
    exploration = 0.2
    ranked = publish.rank_users(policy, users, items, 20, exploration, seed=3)

    features = user_feature_matrix(users.interest, users.strength, users.signup)
    item_features = item_feature_matrix(items.topic, items.numeric, N_TOPICS)
    with torch.no_grad():
        scores = policy.score(features, item_features)
    chosen = torch.from_numpy(ranked.service_rows).long()
    torch.testing.assert_close(torch.from_numpy(ranked.scores), scores.gather(1, chosen),
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.from_numpy(ranked.propensities).double(),
                               _expected_propensity(scores, chosen, exploration),
                               rtol=1e-3, atol=1e-7)
    assert all(len(set(row)) == 20 for row in ranked.service_rows.tolist())
    # Slots that left the greedy order: exploration draws that missed the argmax.
    explored = (ranked.propensities < 1 - exploration).mean()
    assert abs(explored - exploration) < 0.03

    greedy, _, propensity = top_n_for_policy(policy, features[:50], item_features, 20, 0.0,
                                             torch.Generator().manual_seed(0))
    torch.testing.assert_close(greedy, torch.topk(scores[:50], 20).indices)
    assert torch.all(propensity == 1.0)


def _publish(url: str, run_date: date, ranked, items, version: str, keep_runs: int = 30):
    """The write path of `rec.publish`, from scored lists onwards."""
    run_id = f"test-{version}"
    with psycopg.connect(url) as conn:
        table = publish.prepare(conn, run_date, run_id)
        rows = publish.write_rows(conn, table, ranked, items, run_date, version,
                                  datetime.now(UTC))
        conn.commit()
    return publish.swap_in(url, run_date, run_id, rows, keep_runs)


def _lists(url: str, run_date: date) -> tuple:
    with psycopg.connect(url) as conn:
        return conn.execute(
            "select count(*), count(distinct user_id), min(model_version), max(model_version)"
            " from rec.recommendations where run_date = %s", (run_date,)).fetchone()


def test_swap_is_atomic_for_concurrent_readers(fresh_database):
    policy, users, items = _policy_world(4000, 300)
    ranked = publish.rank_users(policy, users, items, 20, 0.1, seed=0)
    day, next_day = date(2026, 3, 1), date(2026, 3, 2)
    _publish(fresh_database, day, ranked, items, "v1")

    seen, stop = [], threading.Event()

    def read() -> None:
        with psycopg.connect(fresh_database, autocommit=True) as conn:
            while not stop.is_set():
                seen.append(conn.execute(
                    "select run_date, count(*), min(model_version), max(model_version)"
                    " from rec.recommendations"
                    " where run_date = (select max(run_date) from rec.recommendations)"
                    " group by run_date").fetchone())

    reader = threading.Thread(target=read)
    reader.start()
    try:
        _publish(fresh_database, day, ranked, items, "v2")
        _publish(fresh_database, next_day, ranked, items, "v3")
    finally:
        stop.set()
        reader.join()

    full = 4000 * 20
    assert len(seen) > 3
    assert {row[1] for row in seen} == {full}
    assert all(row[2] == row[3] for row in seen)
    assert {(row[0], row[2]) for row in seen} <= {(day, "v1"), (day, "v2"), (next_day, "v3")}
    assert _lists(fresh_database, next_day) == (full, 4000, "v3", "v3")


def test_rerun_replaces_only_its_date_and_retention_drops_old_dates(fresh_database):
    policy, users, items = _policy_world(500, 120)
    ranked = publish.rank_users(policy, users, items, 10, 0.1, seed=0)
    days = [date(2026, 3, d) for d in (1, 2, 3)]
    _publish(fresh_database, days[0], ranked, items, "a")
    _publish(fresh_database, days[1], ranked, items, "b")
    figures = _publish(fresh_database, days[0], ranked, items, "c")

    assert figures["replaced_rows"] == 5000
    assert _lists(fresh_database, days[0]) == (5000, 500, "c", "c")
    assert _lists(fresh_database, days[1]) == (5000, 500, "b", "b")

    figures = _publish(fresh_database, days[2], ranked, items, "d", keep_runs=2)
    assert figures["dropped_dates"] == ["2026-03-01"]
    assert _lists(fresh_database, days[0])[0] == 0
    with psycopg.connect(fresh_database) as conn:
        assert publish.partition_dates(conn) == [days[2], days[1]]
        indexes = {r[0] for r in conn.execute(
            "select indexname from pg_indexes where tablename = 'recommendations_20260303'")}
        plan = "\n".join(r[0] for r in conn.execute(
            "explain select * from rec.recommendations"
            " where run_date = '2026-03-03' and user_id = 42"))
    assert indexes == {"recommendations_20260303_pkey", "recommendations_20260303_expert"}
    assert "recommendations_20260303_pkey" in plan


def test_analyst_reads_lists_only(fresh_database):
    policy, users, items = _policy_world(50, 40)
    ranked = publish.rank_users(policy, users, items, 5, 0.1, seed=0)
    _publish(fresh_database, date(2026, 3, 1), ranked, items, "a")
    denied = psycopg.errors.InsufficientPrivilege
    statements = [
        "select count(*) from app.users",
        "delete from rec.recommendations",
        "insert into rec.recommendations select * from rec.recommendations limit 1",
        "select count(*) from rec.model_runs",
        "create table rec.mine (x int)",
        "create table analytics.mine (x int)",
        "create table public.mine (x int)",
    ]
    with psycopg.connect(fresh_database, autocommit=True) as conn:
        conn.execute("set role rec_analyst")
        assert conn.execute("select count(*) from rec.recommendations").fetchone()[0] == 250
        for statement in statements:
            with pytest.raises(denied):
                conn.execute(statement)


def test_dag_scores_user_shards_with_mapped_tasks():
    from airflow.dag_processing.dagbag import DagBag

    from rec.config import REPO_ROOT

    dag = DagBag(dag_folder=str(REPO_ROOT / "dags")).dags["rec_nightly"]
    score_shard = dag.get_task("score_shard")
    assert type(score_shard).__name__.endswith("MappedOperator")
    assert dag.get_task("plan_shards").upstream_task_ids == {"train_agent"}
    assert score_shard.upstream_task_ids == {"plan_shards"}
    assert dag.get_task("swap_in").upstream_task_ids == {"score_shard"}
