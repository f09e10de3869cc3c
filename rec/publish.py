"""Publishing: every user's top-N services for the run date, written atomically.

Users are scored in batches against every active service with the night's policy;
a share of the slots is sampled from the policy rather than taken greedily, and
each row records the propensity of its choice so that tomorrow's logs support
off-policy evaluation. The date's rows are replaced in one transaction: readers
see the previous complete list until the new one commits.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime

import numpy as np
import torch

from rec import db
from rec.config import RunConfig
from rec.features import Items, Users, load_items, load_users
from rec.policy import (
    SlatePolicy,
    item_feature_matrix,
    load_slate_policy,
    top_n_with_exploration,
    user_feature_matrix,
)
from rec.train import latest_artifact, model_version, record_run

log = logging.getLogger(__name__)

COLUMNS = ("run_date", "user_id", "rank", "service_id", "expert_id", "score", "propensity",
           "model_version", "generated_at")


def rank_users(
    policy: SlatePolicy, users: Users, items: Items, top_n: int, exploration: float,
    seed: int, batch_size: int = 8192,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Yield (user ids, service rows (B, n), scores (B, n), propensities (B, n)) per batch."""
    n = min(top_n, len(items))
    generator = torch.Generator().manual_seed(seed)
    item_features = item_feature_matrix(items.topic, items.numeric, users.interest.shape[1])
    with torch.no_grad():
        for start in range(0, len(users), batch_size):
            rows = slice(start, start + batch_size)
            features = user_feature_matrix(users.interest[rows], users.strength[rows],
                                           users.signup[rows])
            scores = policy.score(features, item_features)
            chosen, propensity = top_n_with_exploration(scores, n, exploration, generator)
            yield (users.user_ids[rows], chosen.numpy(), scores.gather(1, chosen).numpy(),
                   propensity.numpy())


def publish(run_date: date, run_id: str, config: RunConfig | None = None,
            url: str | None = None) -> dict:
    """Replace the run date's rows of `rec.recommendations` with a fresh list per user."""
    config = config or RunConfig()
    started = time.perf_counter()
    with db.connect(url) as conn:
        policy_path = latest_artifact(conn, "agent", run_date)
        users = load_users(conn)
        items = load_items(conn)
    if policy_path is None:
        raise RuntimeError(f"no trained policy for {run_date}")
    if len(items) == 0 or len(users) == 0:
        raise RuntimeError(f"nothing to publish for {run_date}: {len(users)} users, "
                           f"{len(items)} active services")
    policy = load_slate_policy(policy_path)
    version = policy.metadata.get("model_version") or model_version(run_date, run_id)
    generated_at = datetime.now(UTC)

    def rows():
        for user_ids, chosen, scores, propensity in rank_users(
                policy, users, items, config.top_n, config.exploration, config.seed):
            service_ids = items.service_ids[chosen]
            expert_ids = items.expert_ids[chosen]
            for b, user_id in enumerate(user_ids.tolist()):
                for r in range(chosen.shape[1]):
                    yield (run_date, user_id, r + 1, int(service_ids[b, r]),
                           int(expert_ids[b, r]), float(scores[b, r]),
                           float(propensity[b, r]), version, generated_at)

    with db.transaction(url) as conn:
        # One publisher per date at a time; readers are never blocked by it.
        conn.execute("select pg_advisory_xact_lock(hashtext('rec.publish'), %s)",
                     (run_date.toordinal(),))
        replaced = conn.execute("delete from rec.recommendations where run_date = %s",
                                (run_date,)).rowcount
        written = db.copy_rows(conn, "rec.recommendations", COLUMNS, rows())
        metrics = {
            "users": len(users),
            "cold_start_users": int(users.cold.sum()),
            "services": len(items),
            "rows": written,
            "rows_replaced": replaced,
            "top_n": min(config.top_n, len(items)),
            "exploration": config.exploration,
            "seconds": time.perf_counter() - started,
        }
        record_run(conn, run_id, run_date, "publish", version, None, metrics)
    log.info("published %d rows for %d users (%d cold start) on %s in %.1fs", written,
             len(users), metrics["cold_start_users"], run_date, metrics["seconds"])
    return metrics
