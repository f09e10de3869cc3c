"""The batched engine: choice sampling, step shapes, interest dynamics, reproducibility."""

from __future__ import annotations

import math

import torch

from rec.choice import ChoiceModel
from rec.sim.engine import (
    ActivityModel,
    BookingResponse,
    Catalogue,
    InterestUserModel,
    SimEnv,
    UserState,
    sample_slate_choice,
)

torch.set_num_threads(1)

N_TOPICS = 4
N_ITEMS = 20


def _env(seed: int = 0, n_users: int = 500, p_active: float = 0.7) -> SimEnv:
    generator = torch.Generator().manual_seed(123)
    interest = torch.softmax(torch.randn(n_users, N_TOPICS, generator=generator), dim=1)
    strength = torch.full((n_users,), 2.0)
    signup = (torch.rand(n_users, N_TOPICS, generator=generator) < 0.3).float()
    catalogue = Catalogue(
        torch.arange(N_ITEMS) % N_TOPICS, torch.randn(N_ITEMS, 2, generator=generator)
    )
    choice = ChoiceModel(N_TOPICS, 2, 5)
    with torch.no_grad():
        choice.affinity.copy_(2.0 * torch.eye(N_TOPICS))
        choice.intercept.fill_(-1.0)
    return SimEnv(
        UserState.from_features(interest, strength, signup),
        catalogue,
        choice,
        BookingResponse(torch.full((N_ITEMS,), 0.3), booking_value=4.0),
        InterestUserModel(half_life_days=7.0),
        horizon=5,
        p_active=p_active,
        seed=seed,
    )


def test_sample_slate_choice_matches_softmax():
    utilities = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]]).repeat_interleave(50000, 0)
    generator = torch.Generator().manual_seed(0)
    choice = sample_slate_choice(utilities, 0.5, generator)

    for row, first in enumerate((0, 50000)):
        counts = torch.bincount(choice[first : first + 50000] + 1, minlength=4).float()
        observed = torch.cat([counts[1:], counts[:1]]) / 50000
        logits = torch.cat([utilities[first], torch.tensor([0.5])])
        expected = torch.softmax(logits, dim=0)
        # five binomial standard errors
        tolerance = 5 * torch.sqrt(expected * (1 - expected) / 50000)
        assert torch.all((observed - expected).abs() < tolerance), (row, observed, expected)


def test_step_shapes_and_episode_length():
    env = _env()
    state = env.reset(torch.arange(100))
    assert state.interest.shape == (100, N_TOPICS)
    days = 0
    total_active = 0.0
    while not env.done:
        slates = torch.arange(5).repeat(100, 1)
        state, reward, info = env.step(slates)
        days += 1
        assert reward.shape == (100,)
        assert info["clicks"].shape == info["bookings"].shape == info["choice"].shape == (100,)
        assert torch.all(info["bookings"] <= info["clicks"])
        assert torch.all(info["clicks"][~info["active"]] == 0)
        torch.testing.assert_close(reward, info["clicks"] + 4.0 * info["bookings"])
        total_active += info["active"].float().mean().item()
    assert days == 5
    assert abs(total_active / days - 0.7) < 0.1


def test_interest_moves_towards_clicked_topic():
    model = InterestUserModel(half_life_days=7.0)
    state = UserState.from_features(
        torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]),
        torch.tensor([math.log1p(4.0), 0.0]),
        torch.zeros(2, 4),
    )
    after = model.update(
        state, torch.tensor([2, 3]), torch.tensor([1.0, 1.0]), torch.tensor([0.0, 1.0])
    )

    decay = 0.5 ** (1 / 7)
    expected_first = torch.tensor([2 * decay, 2 * decay, 1.0, 0.0]) / (4 * decay + 1)
    torch.testing.assert_close(after.interest[0], expected_first)
    torch.testing.assert_close(after.interest[1], torch.tensor([0.0, 0.0, 0.0, 1.0]))
    torch.testing.assert_close(after.strength, torch.log1p(torch.tensor([4 * decay + 1, 5.0])))
    assert after.interest[0, 2] > state.interest[0, 2]


def test_clicks_shift_interest_in_the_env():
    env = _env(p_active=1.0)
    state = env.reset()
    before = state.interest[:, 1].mean().item()
    topic_one = torch.tensor([1, 5, 9, 13, 17])
    while not env.done:
        state, _, _ = env.step(topic_one.repeat(state.n_users, 1))
    assert state.interest[:, 1].mean().item() > before + 0.2


def test_same_seed_same_episode():
    def play(seed: int) -> list[torch.Tensor]:
        env = _env(seed=seed)
        state = env.reset(env.sample_users(200))
        outputs = []
        while not env.done:
            state, reward, info = env.step(torch.arange(5).repeat(200, 1))
            outputs += [reward, info["choice"], state.interest]
        return outputs

    first, again, other = play(7), play(7), play(8)
    for a, b in zip(first, again, strict=True):
        torch.testing.assert_close(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(first, other, strict=True))


def _retention_env(p_active: float = 0.5) -> SimEnv:
    """Two services alike in everything but their expert: a booking with expert 7 makes the
    user visit more often afterwards (+0.08 a day), one with expert 9 less often (-0.08)."""
    n_users = 3000
    interest = torch.full((n_users, N_TOPICS), 1.0 / N_TOPICS)
    choice = ChoiceModel(N_TOPICS, 2, 1)
    with torch.no_grad():
        choice.intercept.fill_(1.0)
    catalogue = Catalogue(torch.zeros(2, dtype=torch.long), torch.zeros(2, 2),
                          torch.tensor([7, 9]))
    return SimEnv(
        UserState.from_features(interest, torch.ones(n_users), torch.zeros(n_users, N_TOPICS)),
        catalogue,
        choice,
        BookingResponse(torch.full((2,), 0.5), booking_value=1.0, click_value=0.0),
        horizon=12,
        p_active=p_active,
        seed=0,
        activity_model=ActivityModel(torch.tensor([0.08, -0.08])),
    )


def test_a_good_expert_keeps_users_active_longer():
    def play(service: int) -> tuple[float, float, float, float]:
        env = _retention_env()
        env.reset()
        active_days = bookings = expected = 0.0
        while not env.done:
            _, _, info = env.step(torch.full((env.state.n_users, 1), service))
            active_days += info["active"].float().mean().item()
            bookings += info["bookings"].mean().item()
            expected += info["expected_reward"].mean().item()
        return active_days, bookings, expected, env.activity.mean().item()

    good, poor = play(0), play(1)

    assert good[0] > poor[0] + 1.5  # days active per user over 12 days
    assert good[1] > poor[1] * 1.3  # more visits, so more bookings
    assert good[3] > 0.65 and poor[3] < 0.35  # activity moved from 0.5
    # Expected rewards track the drawn ones: visits x click probability 1/(1+e^-1) x 0.5.
    assert abs(good[2] - good[1]) < 0.05 * good[1]
    assert 0.01 <= poor[3]


def test_activity_model_clamps_and_ignores_non_bookings():
    model = ActivityModel(torch.tensor([0.3, -0.3]), floor=0.05, ceiling=0.9)
    after = model.update(torch.tensor([0.8, 0.1, 0.5, 0.5]), torch.tensor([0, 1, -1, 0]),
                         torch.tensor([1.0, 1.0, 0.0, 0.0]))
    torch.testing.assert_close(after, torch.tensor([0.9, 0.05, 0.5, 0.5]))
