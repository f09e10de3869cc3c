"""Off-policy evaluation: what a new policy would have earned, estimated from logged feedback.

Logged feedback is one row per impression: the action (item) shown at a position, its reward
and the logging policy's propensity of that action at that position. An evaluation policy is
given as its action distribution per row and position. The estimators (IPS, self-normalised
IPS and doubly robust) return the expected reward per impression, with percentile bootstrap
intervals over rows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoggedFeedback:
    """Impressions logged under a behaviour policy."""

    action: np.ndarray
    """(N,) int, the action (item) shown."""
    position: np.ndarray
    """(N,) int, its 0-based position."""
    reward: np.ndarray
    """(N,) the reward observed (a click: 0 or 1)."""
    pscore: np.ndarray
    """(N,) the behaviour policy's probability of that action at that position."""

    def __post_init__(self) -> None:
        n = len(self.action)
        if not all(len(a) == n for a in (self.position, self.reward, self.pscore)):
            raise ValueError("action, position, reward and pscore must have one length")
        if np.any(self.pscore <= 0):
            raise ValueError("propensities must be positive")


@dataclass(frozen=True)
class Estimate:
    """A policy value estimate with its bootstrap interval."""

    estimate: float
    ci_low: float
    ci_high: float

    def as_dict(self) -> dict[str, float | list[float]]:
        return {"estimate": self.estimate, "ci": [self.ci_low, self.ci_high]}


def _per_row(table: np.ndarray, feedback: LoggedFeedback) -> np.ndarray:
    """A (N, A, P) or (A, P) table read at each row's logged action and position."""
    if table.ndim == 2:
        return table[feedback.action, feedback.position]
    return table[np.arange(len(feedback.action)), feedback.action, feedback.position]


def importance_weights(feedback: LoggedFeedback, action_dist: np.ndarray) -> np.ndarray:
    """(N,) pi_e(a_i | x_i, pos_i) / pi_b(a_i | x_i, pos_i).

    Args:
        feedback: the logged impressions.
        action_dist: (N, A, P) evaluation policy's probabilities per row, action and
            position, or (A, P) for a policy that ignores the context.
    """
    return _per_row(action_dist, feedback) / feedback.pscore


def ips_terms(feedback: LoggedFeedback, action_dist: np.ndarray) -> np.ndarray:
    """(N,) per-row IPS terms w_i r_i; their mean is the IPS estimate."""
    return importance_weights(feedback, action_dist) * feedback.reward


def dr_terms(
    feedback: LoggedFeedback, action_dist: np.ndarray, reward_hat: np.ndarray
) -> np.ndarray:
    """(N,) per-row doubly robust terms; their mean is the DR estimate.

    term_i = sum_a pi_e(a | x_i, pos_i) q(x_i, a, pos_i) + w_i (r_i - q(x_i, a_i, pos_i)).

    Args:
        feedback: the logged impressions.
        action_dist: (N, A, P) or (A, P) evaluation policy probabilities.
        reward_hat: (N, A, P) a reward model's expected reward per row, action and position.
    """
    rows = np.arange(len(feedback.action))
    dist = np.broadcast_to(action_dist, reward_hat.shape)
    direct = np.einsum("na,na->n", dist[rows, :, feedback.position],
                       reward_hat[rows, :, feedback.position])
    logged_hat = reward_hat[rows, feedback.action, feedback.position]
    weights = importance_weights(feedback, action_dist)
    return direct + weights * (feedback.reward - logged_hat)


def ips(feedback: LoggedFeedback, action_dist: np.ndarray) -> float:
    """Inverse propensity scoring: unbiased where the behaviour policy covers pi_e."""
    return float(ips_terms(feedback, action_dist).mean())


def snips(feedback: LoggedFeedback, action_dist: np.ndarray) -> float:
    """Self-normalised IPS: sum w r / sum w; slightly biased, much less variable."""
    weights = importance_weights(feedback, action_dist)
    return float((weights * feedback.reward).sum() / weights.sum())


def dr(feedback: LoggedFeedback, action_dist: np.ndarray, reward_hat: np.ndarray) -> float:
    """Doubly robust: unbiased where either the propensities or the reward model are right."""
    return float(dr_terms(feedback, action_dist, reward_hat).mean())


def bootstrap_interval(
    statistic: Callable[[np.ndarray], np.ndarray],
    n_rows: int,
    *,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
    chunk: int = 200,
) -> tuple[float, float]:
    """Percentile bootstrap interval of a statistic of resampled rows.

    Args:
        statistic: maps (B, N) row indices to (B,) values of the statistic.
        n_rows: N, the rows resampled with replacement.
        n_boot: bootstrap replicates.
        alpha: 1 - the interval's coverage.
        seed: seed of the resampling.
        chunk: replicates drawn at a time (bounds the memory of the index matrix).

    Returns:
        The (alpha/2, 1 - alpha/2) quantiles of the replicates.
    """
    rng = np.random.default_rng(seed)
    values = []
    for start in range(0, n_boot, chunk):
        size = min(chunk, n_boot - start)
        values.append(statistic(rng.integers(0, n_rows, size=(size, n_rows))))
    replicates = np.concatenate(values)
    low, high = np.quantile(replicates, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def _cluster_statistics(estimates: dict, clusters: np.ndarray, weights: np.ndarray,
                        weighted_reward: np.ndarray, dr: np.ndarray | None) -> tuple[dict, int]:
    """The estimators' statistics over resampled clusters, from per-cluster sums, and the
    number of clusters.

    A replicate's IPS (or DR) estimate is its clusters' summed terms over their summed row
    counts, SNIPS its summed weighted rewards over its summed weights: the same figures as
    the row means of the resampled clusters' rows, without touching the rows again.
    """
    _, index = np.unique(clusters, return_inverse=True)

    def sums(values: np.ndarray) -> np.ndarray:
        return np.bincount(index, weights=values)

    rows, reward_sum, weight_sum = sums(np.ones(len(index))), sums(weighted_reward), sums(weights)
    out = {
        "ips": (estimates["ips"][0],
                lambda idx: reward_sum[idx].sum(axis=1) / rows[idx].sum(axis=1)),
        "snips": (estimates["snips"][0],
                  lambda idx: reward_sum[idx].sum(axis=1) / weight_sum[idx].sum(axis=1)),
    }
    if dr is not None:
        dr_sum = sums(dr)
        out["dr"] = (estimates["dr"][0],
                     lambda idx: dr_sum[idx].sum(axis=1) / rows[idx].sum(axis=1))
    return out, len(rows)


def evaluate_policy(
    feedback: LoggedFeedback,
    action_dist: np.ndarray,
    reward_hat: np.ndarray | None = None,
    *,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
    clusters: np.ndarray | None = None,
) -> dict[str, Estimate]:
    """IPS, SNIPS and (with a reward model) DR estimates of pi_e, each with its interval.

    Every estimator is bootstrapped on the same resampled rows (one seed), so their
    intervals are comparable. With `clusters`, whole clusters are resampled instead of rows
    (a cluster bootstrap): rows that share a cluster, such as the impressions of one slate
    or one user's day, are not independent, and resampling clusters keeps that dependence
    in the interval. It also costs replicates x clusters rather than replicates x rows.

    Args:
        feedback: impressions logged under the behaviour policy.
        action_dist: (N, A, P) or (A, P) evaluation policy probabilities.
        reward_hat: (N, A, P) expected rewards from a reward model; DR is skipped without it.
        n_boot: bootstrap replicates.
        alpha: 1 - the intervals' coverage.
        seed: seed of the bootstrap.
        clusters: (N,) int cluster of each row, for a cluster bootstrap; None resamples rows.

    Returns:
        {"ips": Estimate, "snips": Estimate, "dr": Estimate (with a reward model)}.
    """
    n = len(feedback.action)
    weights = importance_weights(feedback, action_dist)
    weighted_reward = weights * feedback.reward
    estimates = {
        "ips": (ips(feedback, action_dist), lambda idx: weighted_reward[idx].mean(axis=1)),
        "snips": (
            snips(feedback, action_dist),
            lambda idx: weighted_reward[idx].sum(axis=1) / weights[idx].sum(axis=1),
        ),
    }
    if reward_hat is not None:
        terms = dr_terms(feedback, action_dist, reward_hat)
        estimates["dr"] = (float(terms.mean()), lambda idx: terms[idx].mean(axis=1))

    if clusters is not None:
        estimates, n = _cluster_statistics(estimates, clusters, weights, weighted_reward,
                                           terms if reward_hat is not None else None)
    results = {}
    for name, (value, statistic) in estimates.items():
        low, high = bootstrap_interval(statistic, n, n_boot=n_boot, alpha=alpha, seed=seed)
        results[name] = Estimate(value, low, high)
        log.info("%s: %.5f [%.5f, %.5f] from %d rows, %d resampled units", name, value,
                 low, high, len(feedback.action), n)
    return results
