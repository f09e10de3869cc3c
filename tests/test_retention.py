"""Long-term estimates from logs: booking model, activity, retention effects per expert."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rec.retention import (
    VisitLog,
    estimate_activity,
    estimate_retention,
    expert_satisfaction,
    fit_booking_model,
)

N_EXPERTS = 40


def _synthetic_log(seed: int = 0, n_users: int = 4000, n_days: int = 28, trend: float = -0.004):
    """Users visit with a daily probability that drifts by `trend` a day and moves by the
    booked expert's effect, 0.02 + 0.03 * quality; ratings are 3.6 + 0.9 * quality + noise."""
    rng = np.random.default_rng(seed)
    quality = rng.normal(0.0, 1.0, N_EXPERTS)
    true_effect = 0.02 + 0.03 * quality
    activity = rng.beta(3.0, 5.0, n_users)
    start_activity = activity.copy()
    first_day = np.where(rng.random(n_users) < 0.2, rng.integers(0, n_days, n_users), 0)
    visits, bookings, reviews = [], [], []
    for day in range(n_days):
        here = (rng.random(n_users) < activity) & (day >= first_day)
        visits.append(np.stack([np.flatnonzero(here), np.full(here.sum(), day)], 1))
        booked = here & (rng.random(n_users) < 0.3)
        experts = rng.integers(0, N_EXPERTS, n_users)
        who = np.flatnonzero(booked)
        bookings.append(np.stack([who, np.full(len(who), day), 100 + experts[who]], 1))
        reviewed = who[rng.random(len(who)) < 0.6]
        rating = np.clip(np.round(3.6 + 0.9 * quality[experts[reviewed]]
                                  + rng.normal(0, 0.6, len(reviewed))), 1, 5)
        reviews.append(np.stack([100 + experts[reviewed], rating], 1))
        change = np.where(booked, true_effect[experts], 0.0) + trend
        activity = np.clip(activity + change, 0.02, 0.95)
    reviews = np.concatenate(reviews)
    visits, bookings = np.concatenate(visits), np.concatenate(bookings)
    log = VisitLog(n_days, first_day, visits[:, 0], visits[:, 1], bookings[:, 0], bookings[:, 1],
                   bookings[:, 2])
    return log, reviews, true_effect, start_activity


def test_retention_effects_are_recovered_from_synthetic_logs():
    log, reviews, true_effect, _ = _synthetic_log(seed=1)
    ids, satisfaction = expert_satisfaction(reviews[:, 0], reviews[:, 1], np.ones(len(reviews)))
    assert list(ids) == list(range(100, 100 + N_EXPERTS))

    effects = estimate_retention(log, ids, satisfaction, window=7)
    estimated = effects.of(np.arange(100, 100 + N_EXPERTS)).numpy()

    # Visits without a booking show the drift away (plus later bookings' effects).
    assert effects.baseline_change < 0
    assert abs(effects.booking_effect - true_effect.mean()) < 0.006
    assert effects.satisfaction_slope > 0
    assert np.corrcoef(estimated, true_effect)[0, 1] > 0.8
    assert np.abs(estimated - true_effect).mean() < 0.015  # true effects spread by 0.03
    # An expert nobody booked gets the effect of an average booking.
    assert float(effects.of(np.array([7]))[0]) == pytest.approx(effects.booking_effect)


def test_without_bookings_the_effect_is_zero_and_activity_is_shrunk():
    log, _, _, start_activity = _synthetic_log(seed=2, n_users=600, trend=0.0)
    empty = VisitLog(log.n_days, log.first_day, log.visit_user, log.visit_day,
                     log.booking_user[:0], log.booking_day[:0], log.booking_expert[:0])
    effects = estimate_retention(empty)
    assert effects.booking_effect == 0.0 and len(effects.effect) == 0

    activity, pooled = estimate_activity(log, recent_days=28)
    assert activity.shape == (600,) and np.all((activity > 0) & (activity < 1))
    assert abs(pooled - log.visit_user.size / (600 * 28 - log.first_day.sum())) < 1e-9
    assert np.corrcoef(activity, start_activity)[0, 1] > 0.5
    # Users observed for fewer days sit closer to the pooled rate.
    late = log.first_day >= 24
    assert np.abs(activity[late] - pooled).mean() < np.abs(activity[~late] - pooled).mean()


def test_booking_model_recovers_interest_and_expert_effects():
    generator = torch.Generator().manual_seed(0)
    n = 20000
    interest = torch.rand(n, generator=generator)
    signup = (torch.rand(n, generator=generator) < 0.3).float()
    numeric = torch.randn(n, 2, generator=generator)
    expert = torch.randint(0, 20, (n,), generator=generator) * 3
    expert_truth = torch.linspace(-1.0, 1.0, 20)
    logit = -1.0 + 2.5 * interest + 0.5 * signup + 0.4 * numeric[:, 0] + expert_truth[expert // 3]
    booked = (torch.rand(n, generator=generator) < torch.sigmoid(logit)).float()

    model, metrics = fit_booking_model(interest, signup, numeric, expert, booked, (0, 1))

    assert abs(model.interest_coef.item() - 2.5) < 0.25
    assert abs(model.signup_coef.item() - 0.5) < 0.15
    assert abs(model.numeric_coef[0].item() - 0.4) < 0.08
    assert abs(model.numeric_coef[1].item()) < 0.08
    fitted = model.expert_effects(torch.arange(20) * 3)
    assert torch.corrcoef(torch.stack([fitted, expert_truth]))[0, 1] > 0.97
    assert model.expert_effects(torch.tensor([1]))[0] == 0.0  # unseen expert: the mean
    assert abs(metrics["booking_rate"] - booked.mean().item()) < 1e-6
