"""Publishing: every user's top-N services for the run date, swapped in atomically.

Users are scored against every active service with the night's policy; a share of the
slots is sampled from the policy rather than taken greedily, and each row records the
propensity of its choice so that tomorrow's logs support off-policy evaluation.

`rec.recommendations` has one partition per run date. A run loads its rows with binary COPY
into a standalone table (`prepare`, `write_shard`, possibly from several workers), indexes
it, then `swap_in` replaces the date's partition in one short transaction: readers see the
previous complete list until it commits and the new complete list after, never a mix.
Partitions beyond the newest `keep_runs` run dates are dropped in the same transaction.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

import numpy as np
import psycopg
import torch

from rec import db, native, topn
from rec.config import RunConfig
from rec.evaluate import champion_policy_path
from rec.features import Items, Users, load_items, load_users
from rec.policy import (
    SlatePolicy,
    item_feature_matrix,
    load_slate_policy,
    top_n_for_policy,
    user_feature_matrix,
)
from rec.train import model_version, record_run

log = logging.getLogger(__name__)

TABLE = "rec.recommendations"
COLUMNS = ("run_date", "user_id", "rank", "service_id", "expert_id", "score", "propensity",
           "model_version", "generated_at")
SELECT_ROWS = 16_384
"""Users whose candidates are held at once while their slots are filled (bounds memory); also
the unit of work of the threads, small enough that they finish together."""
FACTOR_ROWS = 8192
"""Users whose factors the native path computes at once."""
COPY_ROWS = 16_384
"""Users per COPY message batch."""
PG_EPOCH = date(2000, 1, 1)
PARTITION = re.compile(r"^recommendations_(\d{8})$")


@dataclass
class Ranked:
    """Each user's list: row u of the matrices belongs to user_ids[u]."""

    user_ids: np.ndarray
    service_rows: np.ndarray
    """(U, n) int32 rows into the catalogue (Items)."""
    scores: np.ndarray
    propensities: np.ndarray

    def __len__(self) -> int:
        return len(self.user_ids)


def empty_ranked(user_ids: np.ndarray, n: int) -> Ranked:
    """Uninitialised lists for these users, n slots each, for `rank_users(out=...)`."""
    shape = (len(user_ids), n)
    return Ranked(user_ids, np.empty(shape, np.int32), np.empty(shape, np.float32),
                  np.empty(shape, np.float32))


def rank_users(policy: SlatePolicy, users: Users, items: Items, top_n: int,
               exploration: float, seed: int, threads: int = 2,
               out: Ranked | None = None) -> Ranked:
    """Every user's top-n list with exploration, into `out` where given (`empty_ranked`).

    Blocks of SELECT_ROWS users go to `threads` worker threads, each running on one core:
    independent workers keep both cores busy without the per-operation synchronisation of
    torch's intra-op threads, which the many small selection steps would pay for. Block k
    draws from its own generator, so the lists depend on the seed alone, not on the number
    of threads or their timing; for factorised policies each user's numbers are a function
    of the seed and the user's row (`rec.topn.CounterUniforms`), whatever the blocks.

    Policies with a `factors` method are ranked by the fused native kernel (`rec.native`)
    where it is available: the same lists as the torch path (`top_n_for_policy`) from the
    same seed, up to float rounding at draw boundaries, several times faster. The kernel also
    runs the user tower of policies that expose it (`user_tower_layers`).
    """
    torch.set_num_threads(1)
    n = min(top_n, len(items))
    item_features = item_feature_matrix(items.topic, items.numeric, users.interest.shape[1])
    ranked = empty_ranked(users.user_ids, n) if out is None else out
    if ranked.service_rows.shape != (len(users), n):
        raise ValueError(f"out holds {ranked.service_rows.shape} slots, not {(len(users), n)}")
    kernel = native.library() if hasattr(policy, "factors") and 0 < n <= native.MAX_N else None
    tower = None
    if kernel is not None:
        with torch.no_grad():
            features = user_feature_matrix(users.interest[:1], users.strength[:1],
                                           users.signup[:1])
            _, item_vectors, cap = policy.factors(features, item_features)
        items_t = native.transposed_items(item_vectors)
        tower = (native.UserTower(kernel, policy.user_tower_layers())
                 if hasattr(policy, "user_tower_layers") else None)

    def user_factors(features: torch.Tensor) -> torch.Tensor:
        if tower is not None:
            return tower.factors(features)
        return policy.factors(features, item_features[:1])[0]

    # A factorised policy's slots read counter-based numbers: user i's are the same in any
    # block, thread or path (native or torch).
    draws = topn.CounterUniforms(seed)

    def rank_block(start: int) -> None:
        rows = slice(start, start + SELECT_ROWS)
        with torch.no_grad():
            features = user_feature_matrix(users.interest[rows], users.strength[rows],
                                           users.signup[rows])
            if kernel is not None:
                # Small steps keep the user factors in cache and off the heap.
                for sub in range(0, len(features), FACTOR_ROWS):
                    part = slice(sub, sub + FACTOR_ROWS)
                    user_vectors = user_factors(features[part])
                    out = slice(start + sub, start + min(sub + FACTOR_ROWS, len(features)))
                    native.rank(kernel, user_vectors, items_t, cap, n, len(items), exploration,
                                draws.at(out.start), ranked.service_rows[out],
                                ranked.scores[out], ranked.propensities[out])
                return
            generator = (draws.at(start) if hasattr(policy, "factors") else
                         torch.Generator().manual_seed(seed * 1_000_003 + start // SELECT_ROWS))
            chosen, scores, propensity = top_n_for_policy(
                policy, features, item_features, n, exploration, generator)
        ranked.service_rows[rows] = chosen.numpy()
        ranked.scores[rows] = scores.numpy()
        ranked.propensities[rows] = propensity.numpy()

    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(rank_block, range(0, len(users), SELECT_ROWS)))
    return ranked


def staging_table(run_date: date, run_id: str) -> str:
    """The standalone table a run loads its rows into (unqualified, in schema `rec`)."""
    return f"recommendations_{run_date:%Y%m%d}_{hashlib.sha1(run_id.encode()).hexdigest()[:8]}"


def _partition_name(run_date: date) -> str:
    return f"recommendations_{run_date:%Y%m%d}"


def prepare(conn: psycopg.Connection, run_date: date, run_id: str) -> str:
    """(Re)create the run's empty staging table, shaped and constrained like a partition."""
    table = staging_table(run_date, run_id)
    conn.execute(f"drop table if exists rec.{table}")
    # The bound as a CHECK lets ATTACH PARTITION skip its validation scan.
    conn.execute(
        f"create table rec.{table} (like {TABLE} including defaults including constraints,"
        f" constraint {table}_bound check (run_date >= '{run_date}'"
        f" and run_date < '{run_date + timedelta(days=1)}'))")
    return table


def copy_dtype(version_bytes: int) -> np.dtype:
    """One row of PostgreSQL's binary COPY format for COLUMNS, as a packed numpy record."""
    fields = [("fields", ">i2")]
    for name, kind in (("run_date", ">i4"), ("user_id", ">i8"), ("rank", ">i2"),
                       ("service_id", ">i4"), ("expert_id", ">i4"), ("score", ">f4"),
                       ("propensity", ">f4"), ("model_version", f"S{version_bytes}"),
                       ("generated_at", ">i8")):
        fields += [(f"{name}_length", ">i4"), (name, kind)]
    return np.dtype(fields)


COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + (0).to_bytes(4, "big") + (0).to_bytes(4, "big")
COPY_TRAILER = (-1).to_bytes(2, "big", signed=True)


def copy_payload(ranked: Ranked, items: Items, run_date: date, version: str,
                 generated_at: datetime, start: int, stop: int) -> bytes:
    """Binary COPY rows of users start..stop, built column by column with numpy."""
    version_bytes = version.encode()
    n = ranked.service_rows.shape[1]
    users = stop - start
    record = np.empty(users * n, dtype=copy_dtype(len(version_bytes)))
    record["fields"] = len(COLUMNS)
    for name in COLUMNS:
        record[f"{name}_length"] = record.dtype[name].itemsize
    record["run_date"] = (run_date - PG_EPOCH).days
    record["user_id"] = np.repeat(ranked.user_ids[start:stop], n)
    record["rank"] = np.tile(np.arange(1, n + 1, dtype=np.int16), users)
    chosen = ranked.service_rows[start:stop].ravel()
    record["service_id"] = items.service_ids[chosen]
    record["expert_id"] = items.expert_ids[chosen]
    record["score"] = ranked.scores[start:stop].ravel()
    record["propensity"] = ranked.propensities[start:stop].ravel()
    record["model_version"] = version_bytes
    since_epoch = generated_at - datetime(2000, 1, 1, tzinfo=UTC)
    record["generated_at"] = since_epoch // timedelta(microseconds=1)
    return record.tobytes()


def write_rows(conn: psycopg.Connection, table: str, ranked: Ranked, items: Items,
               run_date: date, version: str, generated_at: datetime) -> int:
    """COPY every user's list into rec.`table`; the caller commits. Returns rows written."""
    with conn.cursor() as cur:
        with cur.copy(f"copy rec.{table} ({', '.join(COLUMNS)}) from stdin (format binary)"
                      ) as copy:
            copy.write(COPY_HEADER)
            for start in range(0, len(ranked), COPY_ROWS):
                stop = min(start + COPY_ROWS, len(ranked))
                copy.write(copy_payload(ranked, items, run_date, version, generated_at,
                                        start, stop))
            copy.write(COPY_TRAILER)
    return len(ranked) * ranked.service_rows.shape[1]


def build_indexes(conn: psycopg.Connection, table: str) -> None:
    """The partition's copies of the parent's indexes, so that ATTACH only links them.

    A retry after a failed swap finds them built already.
    """
    if conn.execute("select to_regclass(%s)", (f"rec.{table}_pkey",)).fetchone()[0]:
        return
    conn.execute(f"alter table rec.{table} add constraint {table}_pkey"
                 " primary key (run_date, user_id, rank)")
    conn.execute(f"create index {table}_expert on rec.{table} (expert_id, user_id)")
    conn.execute(f"analyze rec.{table}")


def swap_in(url: str | None, run_date: date, run_id: str, expected_rows: int,
            keep_runs: int, lock_timeout_s: float = 60.0) -> dict:
    """Index the run's staging table and make it the date's partition in one transaction.

    Refuses a staging table whose row count differs from `expected_rows`: an incomplete
    list never becomes visible. Then drops partitions beyond the newest `keep_runs` dates.
    """
    table = staging_table(run_date, run_id)
    started = time.perf_counter()
    with db.connect(url) as conn:
        if conn.execute("select to_regclass(%s)", (f"rec.{table}",)).fetchone()[0] is None:
            raise RuntimeError(f"rec.{table} is gone: swapped in already, or never prepared")
        rows = conn.execute(f"select count(*) from rec.{table}").fetchone()[0]
        if rows != expected_rows:
            raise RuntimeError(f"rec.{table} holds {rows} rows, expected {expected_rows}")
        build_indexes(conn, table)
        conn.commit()
        indexed = time.perf_counter()

        partition = _partition_name(run_date)
        # Limitation: a REPEATABLE READ transaction whose snapshot predates the staging COPY
        # and that first reads the date after the swap finds the new partition's rows
        # invisible (DDL is not MVCC); READ COMMITTED readers, the default, are unaffected.
        with conn.transaction():
            conn.execute("select pg_advisory_xact_lock(hashtext('rec.publish'))")
            # Limitation: a reader holding the parent longer than this fails the swap (the
            # task retries) rather than waiting for it indefinitely.
            conn.execute(f"set local lock_timeout = '{int(lock_timeout_s * 1000)}ms'")
            replaced = _drop_partition(conn, partition)
            conn.execute(f"alter table rec.{table} rename to {partition}")
            for suffix in ("pkey", "expert", "bound"):
                kind = "constraint" if suffix != "expert" else "index"
                old, new = f"{table}_{suffix}", f"{partition}_{suffix}"
                if kind == "index":
                    conn.execute(f"alter index rec.{old} rename to {new}")
                else:
                    conn.execute(f"alter table rec.{partition} rename constraint {old} to {new}")
            conn.execute(
                f"alter table {TABLE} attach partition rec.{partition}"
                f" for values from ('{run_date}') to ('{run_date + timedelta(days=1)}')")
            dropped = [d.isoformat() for d in partition_dates(conn)[keep_runs:]]
            for day in dropped:
                _drop_partition(conn, _partition_name(date.fromisoformat(day)), count=False)
    figures = {"rows": rows, "replaced_rows": replaced, "dropped_dates": dropped,
               "index_s": round(indexed - started, 3),
               "swap_s": round(time.perf_counter() - indexed, 3)}
    log.info("swapped in %d rows for %s (replaced %d; dropped %s); index %.1fs, swap %.2fs",
             rows, run_date, replaced, dropped or "none", figures["index_s"], figures["swap_s"])
    return figures


def _drop_partition(conn: psycopg.Connection, partition: str, count: bool = True) -> int:
    """Detach and drop a date's partition if it exists; returns its row count (or 0).

    Counting scans the partition, so it happens before DETACH takes the parent's exclusive
    lock, and callers already holding that lock skip it.
    """
    exists = conn.execute("select to_regclass(%s)", (f"rec.{partition}",)).fetchone()[0]
    if exists is None:
        return 0
    rows = conn.execute(f"select count(*) from rec.{partition}").fetchone()[0] if count else 0
    conn.execute(f"alter table {TABLE} detach partition rec.{partition}")
    conn.execute(f"drop table rec.{partition}")
    return rows


def partition_dates(conn: psycopg.Connection) -> list[date]:
    """Run dates with a partition, newest first."""
    names = conn.execute(
        "select c.relname from pg_inherits i join pg_class c on c.oid = i.inhrelid"
        " where i.inhparent = %s::regclass", (TABLE,)).fetchall()
    found = [PARTITION.match(name) for (name,) in names]
    return sorted((datetime.strptime(m.group(1), "%Y%m%d").date() for m in found if m),
                  reverse=True)


def plan_shards(run_date: date, run_id: str, users_per_shard: int,
                url: str | None = None) -> list[dict]:
    """Create the run's staging table and split the users into ranges of user ids."""
    with db.transaction(url) as conn:
        prepare(conn, run_date, run_id)
        user_ids = [r[0] for r in conn.execute(
            "select user_id from analytics.user_features order by user_id")]
    if not user_ids:
        raise RuntimeError(f"nothing to publish for {run_date}: no users")
    bounds = range(0, len(user_ids), max(1, users_per_shard))
    shards = [{"shard": k, "first_user": user_ids[b],
               "last_user": user_ids[min(b + users_per_shard, len(user_ids)) - 1]}
              for k, b in enumerate(bounds)]
    log.info("planned %d shards of up to %d users for %s", len(shards), users_per_shard,
             run_date)
    return shards


def write_shard(run_date: date, run_id: str, shard: dict, config: RunConfig | None = None,
                url: str | None = None) -> dict:
    """Score one shard's users and COPY their lists into the run's staging table.

    A retried shard first deletes what an earlier attempt of it wrote, in the same
    transaction as its COPY.
    """
    config = config or RunConfig()
    started = time.perf_counter()
    first, last = shard["first_user"], shard["last_user"]
    with db.connect(url) as conn:
        # The champion as tonight's gate decided: a challenger that lost is never published.
        policy_path = champion_policy_path(conn, run_date)
        users = load_users(conn, user_range=(first, last))
        items = load_items(conn)
    if policy_path is None:
        raise RuntimeError(f"no champion policy for {run_date}: train_agent decides it")
    if len(items) == 0:
        raise RuntimeError(f"nothing to publish for {run_date}: no active services")
    policy = load_slate_policy(policy_path)
    version = policy.metadata.get("model_version") or model_version(run_date, run_id)
    # The seed varies with the night as well as the shard: the same seed every night would
    # explore the same slots of the same users night after night.
    ranked = rank_users(policy, users, items, config.top_n, config.exploration,
                        (config.seed * 1_000_003 + run_date.toordinal()) * 100_003
                        + shard["shard"])
    scored = time.perf_counter()

    table = staging_table(run_date, run_id)
    with db.transaction(url) as conn:
        conn.execute(f"delete from rec.{table} where user_id between %s and %s", (first, last))
        written = write_rows(conn, table, ranked, items, run_date, version,
                             datetime.now(UTC))
    figures = {"shard": shard["shard"], "users": len(users), "rows": written,
               "cold_start_users": int(users.cold.sum()), "services": len(items),
               "score_s": round(scored - started, 3),
               "write_s": round(time.perf_counter() - scored, 3), "model_version": version}
    log.info("shard %d: %d users, %d rows; scored in %.1fs, written in %.1fs",
             shard["shard"], len(users), written, figures["score_s"], figures["write_s"])
    return figures


def finish(run_date: date, run_id: str, shards: list[dict], config: RunConfig | None = None,
           url: str | None = None) -> dict:
    """Swap the run's complete list in and record the publish figures."""
    config = config or RunConfig()
    expected = sum(s["rows"] for s in shards)
    swapped = swap_in(url, run_date, run_id, expected, config.keep_runs)
    version = shards[0]["model_version"]
    metrics = {
        "users": sum(s["users"] for s in shards),
        "cold_start_users": sum(s["cold_start_users"] for s in shards),
        "services": shards[0]["services"],
        "rows": expected,
        "rows_replaced": swapped["replaced_rows"],
        "shards": len(shards),
        "top_n": min(config.top_n, shards[0]["services"]),
        "exploration": config.exploration,
        "score_s": sum(s["score_s"] for s in shards),
        "write_s": sum(s["write_s"] for s in shards),
        "index_s": swapped["index_s"],
        "swap_s": swapped["swap_s"],
        "dropped_dates": swapped["dropped_dates"],
    }
    with db.transaction(url) as conn:
        record_run(conn, run_id, run_date, "publish", version, None, metrics)
    return metrics


def publish(run_date: date, run_id: str, config: RunConfig | None = None,
            url: str | None = None) -> dict:
    """Replace the run date's list with a fresh one per user, in one process."""
    config = config or RunConfig()
    started = time.perf_counter()
    shards = plan_shards(run_date, run_id, 1 << 62, url)
    metrics = finish(run_date, run_id,
                     [write_shard(run_date, run_id, s, config, url) for s in shards],
                     config, url)
    log.info("published %d rows for %d users (%d cold start) on %s in %.1fs",
             metrics["rows"], metrics["users"], metrics["cold_start_users"], run_date,
             time.perf_counter() - started)
    return metrics
