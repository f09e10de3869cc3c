"""Off-policy estimators on synthetic bandit data whose true policy value is known."""

from __future__ import annotations

import numpy as np
import pytest

from rec.ope import LoggedFeedback, dr, evaluate_policy, ips, snips
from rec.open_bandit import bts_action_dist

N_ACTIONS, N_POSITIONS, N_ROWS = 5, 2, 20_000


def synthetic(seed: int = 0):
    """Context-free logs: a non-uniform behaviour policy, known click rates per (item, pos)."""
    rng = np.random.default_rng(seed)
    click_rate = rng.uniform(0.02, 0.2, size=(N_ACTIONS, N_POSITIONS))
    behaviour = rng.dirichlet(np.ones(N_ACTIONS) * 2, size=N_POSITIONS).T  # (A, P)
    target = rng.dirichlet(np.ones(N_ACTIONS) * 2, size=N_POSITIONS).T
    position = rng.integers(0, N_POSITIONS, N_ROWS)
    action = np.array([rng.choice(N_ACTIONS, p=behaviour[:, p]) for p in position])
    reward = (rng.random(N_ROWS) < click_rate[action, position]).astype(float)
    feedback = LoggedFeedback(action, position, reward, behaviour[action, position])
    # Positions are drawn uniformly, so the target's value averages its per-position values.
    truth = float(np.mean((target * click_rate).sum(axis=0)))
    return feedback, target, click_rate, truth


def test_estimators_recover_the_true_value_and_their_intervals_cover_it():
    feedback, target, click_rate, truth = synthetic(seed=0)
    reward_hat = np.broadcast_to(click_rate * 0.7, (N_ROWS, N_ACTIONS, N_POSITIONS))

    results = evaluate_policy(feedback, target, reward_hat, n_boot=300, seed=1)

    assert set(results) == {"ips", "snips", "dr"}
    for name, estimate in results.items():
        assert estimate.ci_low <= truth <= estimate.ci_high, (name, estimate, truth)
        assert abs(estimate.estimate - truth) / truth < 0.05, (name, estimate, truth)


def test_dr_with_the_true_reward_model_is_tighter_than_ips():
    feedback, target, click_rate, _ = synthetic(seed=2)
    exact = np.broadcast_to(click_rate, (N_ROWS, N_ACTIONS, N_POSITIONS))

    results = evaluate_policy(feedback, target, exact, n_boot=300, seed=0)

    width = {name: e.ci_high - e.ci_low for name, e in results.items()}
    assert width["dr"] < width["ips"]


def test_evaluating_the_behaviour_policy_gives_the_logged_mean():
    feedback, _, click_rate, _ = synthetic(seed=3)
    behaviour = np.zeros((N_ACTIONS, N_POSITIONS))
    for a, p, s in zip(feedback.action, feedback.position, feedback.pscore, strict=True):
        behaviour[a, p] = s
    zero_model = np.zeros((N_ROWS, N_ACTIONS, N_POSITIONS))

    assert ips(feedback, behaviour) == pytest.approx(feedback.reward.mean())
    assert snips(feedback, behaviour) == pytest.approx(feedback.reward.mean())
    assert dr(feedback, behaviour, zero_model) == pytest.approx(feedback.reward.mean())


def test_per_row_action_distributions_match_a_context_free_one():
    feedback, target, click_rate, _ = synthetic(seed=4)
    per_row = np.broadcast_to(target, (N_ROWS, N_ACTIONS, N_POSITIONS))

    assert ips(feedback, per_row) == pytest.approx(ips(feedback, target))


def test_intervals_are_reproducible_with_a_seed():
    feedback, target, _, _ = synthetic(seed=5)

    first = evaluate_policy(feedback, target, n_boot=200, seed=7)
    second = evaluate_policy(feedback, target, n_boot=200, seed=7)

    assert first == second and "dr" not in first


def test_bts_action_dist_ranks_items_by_their_posterior_draws():
    alpha = np.array([900.0, 1.0, 50.0, 1.0])
    beta = np.array([100.0, 999.0, 950.0, 999.0])

    dist = bts_action_dist(alpha, beta, 3, n_sim=5000, seed=0)

    np.testing.assert_allclose(dist.sum(axis=0), 1.0)
    assert dist[0, 0] == 1.0 and dist[2, 1] == 1.0
    assert dist[1, 2] + dist[3, 2] == 1.0 and 0.3 < dist[1, 2] < 0.7
