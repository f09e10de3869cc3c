"""The nightly agent in a fitted environment where bookings and retention disagree with clicks.

Flashy services draw clicks but rarely book and make users come back less; good ones draw
fewer clicks, book more and keep users coming back. The myopic click ranking shows the
flashy ones; the agent (the lookahead distilled into a two-tower policy, then REINFORCE) must
beat it on long-term bookings by the gate's paired interval. The control-arm switch is
checked here too.
"""

from __future__ import annotations

import os
from unittest import mock

import pytest
import torch

from rec.agents.baselines import MyopicPolicy, RandomPolicy
from rec.agents.lookahead import DistillArgs, Lookahead, distill
from rec.agents.reinforce import ReinforceArgs, train_reinforce
from rec.choice import ChoiceModel
from rec.config import RunConfig
from rec.evaluate import gate
from rec.policy import TwoTowerPolicy
from rec.retention import BookingModel
from rec.sim.engine import ActivityModel, BookingResponse, Catalogue, SimEnv, UserState

torch.set_num_threads(1)

N_TOPICS = 4
N_ITEMS = 48
SLATE_SIZE = 3


def _long_term_env() -> SimEnv:
    generator = torch.Generator().manual_seed(0)
    n_users = 2000
    interest = torch.softmax(2.0 * torch.randn(n_users, N_TOPICS, generator=generator), dim=1)
    cold = torch.rand(n_users, generator=generator) < 0.3
    interest[cold] = 0.0
    strength = torch.where(cold, 0.0, 1.5)
    signup = (interest > 0.3).float() + cold.float().unsqueeze(1) * (
        torch.rand(n_users, N_TOPICS, generator=generator) < 0.4).float()
    quality = torch.randn(N_ITEMS, generator=generator)
    flashy = -quality + 0.3 * torch.randn(N_ITEMS, generator=generator)
    catalogue = Catalogue(torch.arange(N_ITEMS) % N_TOPICS, torch.stack([flashy, quality], 1),
                          torch.arange(N_ITEMS) // 2)

    choice = ChoiceModel(N_TOPICS, 2, SLATE_SIZE)
    booking = BookingModel([1])
    with torch.no_grad():
        choice.affinity.copy_(3.0 * torch.eye(N_TOPICS))
        choice.signup_coef.fill_(1.0)
        choice.numeric_coef.copy_(torch.tensor([0.8, 0.0]))
        choice.later_position_bias.copy_(torch.tensor([-0.3, -0.6]))
        choice.intercept.fill_(-2.5)
        booking.intercept.fill_(-1.0)
        booking.interest_coef.fill_(2.0)
        booking.numeric_coef.fill_(1.2)
    return SimEnv(
        UserState.from_features(interest, strength, signup),
        catalogue,
        choice,
        BookingResponse(torch.zeros(N_ITEMS), booking_value=1.0, click_value=0.0,
                        booking_model=booking),
        horizon=10,
        p_active=0.5,
        seed=0,
        activity_model=ActivityModel(0.05 * quality),
    )


@pytest.fixture(scope="module")
def agent():
    env = _long_term_env()
    lookahead = Lookahead(env, reward_per_visit=0.1)
    start, metrics = distill(env, lookahead, None, DistillArgs(steps=60, batch_users=256))
    args = ReinforceArgs(seed=0, num_updates=20, batch_users=256, slate_size=SLATE_SIZE,
                         learning_rate=1e-3, entropy_coef=0.0, topk_correction=False)
    policy, _ = train_reinforce(env, start, args)
    return env, policy, metrics


def test_lookahead_values_bookings_and_retention_over_clicks():
    env = _long_term_env()
    state = env.population.index(torch.arange(500))
    values = Lookahead(env, reward_per_visit=0.1).values(state)
    clicks = env.choice_model.all_item_utilities(
        state.interest, state.strength, state.signup, env.catalogue.topic, env.catalogue.numeric)

    assert values.shape == (500, N_ITEMS) and torch.all(values >= 0)
    quality = env.catalogue.numeric[:, 1]
    best_value = quality[values.argmax(dim=1)].mean()
    best_click = quality[clicks.argmax(dim=1)].mean()
    assert best_value > best_click + 1.0


def test_gate_promotes_the_agent_over_the_myopic_ranking(agent):
    env, policy, metrics = agent
    myopic = MyopicPolicy(env.choice_model)

    result = gate(env, policy, myopic, {"myopic": myopic, "random": RandomPolicy(0)},
                  SLATE_SIZE, cold=env.population.strength == 0)

    assert metrics["losses/distill"][1] < metrics["losses/distill"][0] - 0.5
    assert result["decision"] == "promote"
    assert result["difference"]["ci"][0] > 0
    assert result["versus"]["myopic"]["ci"][0] > 0
    simulated = result["simulated"]
    assert simulated["challenger"]["bookings"] > 1.2 * simulated["myopic"]["bookings"]
    # Better sessions keep users active on more days.
    assert simulated["challenger"]["active_days"] > simulated["myopic"]["active_days"]
    # Users without history get lists from their sign-up topics that beat random ones.
    assert simulated["challenger"]["cold_start_return"] > 2 * simulated["random"][
        "cold_start_return"]


def test_published_policy_stays_factorised(agent):
    _, policy, _ = agent
    assert isinstance(policy, TwoTowerPolicy)
    users = torch.rand(5, 2 * N_TOPICS + 1)
    items = torch.rand(N_ITEMS, N_TOPICS + 2)
    user_vectors, item_vectors, cap = policy.factors(users, items)
    with torch.no_grad():
        torch.testing.assert_close(cap * torch.tanh(user_vectors @ item_vectors.T / cap),
                                   policy.score(users, items))


def test_arm_comes_from_the_environment_and_is_checked():
    assert RunConfig().arm == "rl"
    with mock.patch.dict(os.environ, {"REC_ARM": "myopic"}):
        assert RunConfig.from_env().arm == "myopic"
        assert RunConfig.from_env(arm="popularity").arm == "popularity"
    with pytest.raises(ValueError, match="unknown arm"):
        RunConfig(arm="greedy")
    with pytest.raises(ValueError, match="unknown reward"):
        RunConfig(reward="clicks")
