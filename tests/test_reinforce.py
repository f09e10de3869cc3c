"""REINFORCE learns the long-term value of bookings; top-N selection; policy files."""

from __future__ import annotations

import pytest
import torch

from rec.agents.baselines import MyopicPolicy, PopularityPolicy, RandomPolicy
from rec.agents.reinforce import (
    ReinforceArgs,
    discounted_returns,
    evaluate_policy,
    topk_correction_weight,
    train_reinforce,
)
from rec.choice import ChoiceModel
from rec.policy import (
    TwoTowerPolicy,
    item_feature_matrix,
    load_slate_policy,
    top_n_with_exploration,
    user_feature_matrix,
)
from rec.sim.engine import BookingResponse, Catalogue, InterestUserModel, SimEnv, UserState

torch.set_num_threads(1)

N_TOPICS = 4
N_ITEMS = 40
SLATE_SIZE = 3


def _booking_env() -> SimEnv:
    """Topic 0 is clicked less often but books ten times as often as the others."""
    generator = torch.Generator().manual_seed(0)
    n_users = 2000
    interest = torch.softmax(1.5 * torch.randn(n_users, N_TOPICS, generator=generator), dim=1)
    no_history = torch.rand(n_users, generator=generator) < 0.3
    interest[no_history] = 0.0
    strength = torch.where(no_history, 0.0, 1.0 + torch.rand(n_users, generator=generator))
    signup = (torch.rand(n_users, N_TOPICS, generator=generator) < 0.3).float()
    topic = torch.arange(N_ITEMS) % N_TOPICS
    numeric = torch.randn(N_ITEMS, 2, generator=generator)

    choice = ChoiceModel(N_TOPICS, 2, 5)
    with torch.no_grad():
        choice.affinity.copy_(2.5 * torch.eye(N_TOPICS))
        choice.signup_coef.fill_(0.5)
        choice.topic_bias.copy_(torch.tensor([-1.0, 0.3, 0.3, 0.3]))
        choice.numeric_coef.copy_(torch.tensor([0.3, 0.0]))
        choice.later_position_bias.copy_(torch.tensor([-0.2, -0.4, -0.6, -0.8]))
        choice.intercept.fill_(-1.5)
    booking_rate = torch.where(topic == 0, 0.6, 0.05)
    return SimEnv(
        UserState.from_features(interest, strength, signup),
        Catalogue(topic, numeric),
        choice,
        BookingResponse(booking_rate, booking_value=4.0),
        InterestUserModel(half_life_days=7.0),
        horizon=6,
        p_active=0.8,
        seed=0,
    )


@pytest.fixture(scope="module")
def trained():
    env = _booking_env()
    args = ReinforceArgs(
        seed=0, num_updates=60, batch_users=1024, slate_size=SLATE_SIZE, learning_rate=5e-3
    )
    policy, metrics = train_reinforce(env, None, args)
    return env, policy, metrics


def test_reinforce_beats_random_and_myopic(trained):
    env, policy, metrics = trained
    random_return = evaluate_policy(env, RandomPolicy(seed=0), 1024, SLATE_SIZE, seed=99)
    myopic_return = evaluate_policy(env, MyopicPolicy(env.choice_model), 1024, SLATE_SIZE, 99)
    learned_return = evaluate_policy(env, policy, 1024, SLATE_SIZE, seed=99)

    assert learned_return > 1.5 * random_return
    assert learned_return > myopic_return + 1.0
    curve = metrics["learning_curve"]
    assert len(curve) == 60
    assert sum(curve[-10:]) / 10 > sum(curve[:10]) / 10 + 1.0
    assert metrics["final_mean_return"] > 1.5 * random_return
    assert metrics["charts/SPS"] > 0


def test_warm_start_continues_from_the_given_policy(trained):
    env, policy, _ = trained
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    args = ReinforceArgs(seed=1, num_updates=3, batch_users=256, slate_size=SLATE_SIZE)
    continued, metrics = train_reinforce(env, policy, args)

    assert continued is policy
    assert any(not torch.equal(before[k], v) for k, v in continued.state_dict().items())
    random_return = evaluate_policy(env, RandomPolicy(seed=0), 1024, SLATE_SIZE, seed=99)
    # three small updates keep most of what was learned
    assert metrics["final_mean_return"] > 1.4 * random_return


def test_discounted_returns_and_topk_weight():
    rewards = torch.tensor([[1.0, 0.0, 2.0]])
    torch.testing.assert_close(discounted_returns(rewards, 0.5), torch.tensor([[1.5, 1.0, 2.0]]))
    log_pi = torch.log(torch.tensor([0.5, 0.01]))
    torch.testing.assert_close(
        topk_correction_weight(log_pi, 3), torch.tensor([3 * 0.25, 3 * 0.99**2])
    )


def test_top_n_with_exploration():
    generator = torch.Generator().manual_seed(0)
    # 4,000 rows: the first-slot frequency below has a standard error of about 0.007.
    scores = torch.randn(4000, 30, generator=generator)

    greedy, propensity = top_n_with_exploration(scores, 5, 0.0, generator)
    torch.testing.assert_close(greedy, torch.topk(scores, 5, dim=1).indices)
    torch.testing.assert_close(propensity, torch.ones(4000, 5))

    indices, propensity = top_n_with_exploration(scores, 10, 0.3, generator)
    assert indices.shape == propensity.shape == (4000, 10)
    assert all(len(set(row)) == 10 for row in indices.tolist())
    assert torch.all(propensity > 0) and torch.all(propensity <= 1)
    first_is_argmax = indices[:, 0] == scores.argmax(dim=1)
    # the first slot is the argmax with probability 0.7 + 0.3 * softmax(argmax)
    expected = 0.7 + 0.3 * torch.softmax(scores, dim=1).max(dim=1).values.mean().item()
    assert abs(first_is_argmax.float().mean().item() - expected) < 0.03
    assert torch.all(propensity[first_is_argmax, 0] >= 0.7)
    assert torch.all(propensity[~first_is_argmax, 0] < 0.3)


def test_save_and_load_give_identical_scores(tmp_path, trained):
    env, policy, _ = trained
    state = env.reset(torch.arange(50))
    users = user_feature_matrix(state.interest, state.strength, state.signup)
    items = item_feature_matrix(env.catalogue.topic, env.catalogue.numeric, N_TOPICS)
    popularity = torch.arange(N_ITEMS, dtype=torch.float32)
    policies = [
        policy,
        PopularityPolicy(N_ITEMS, popularity),
        MyopicPolicy(env.choice_model),
        TwoTowerPolicy(N_TOPICS, 2),
    ]
    for number, original in enumerate(policies):
        path = tmp_path / f"policy_{number}.pt"
        original.save(path, metadata={"model_version": f"v{number}"})
        restored = load_slate_policy(path)

        assert type(restored) is type(original)
        assert restored.metadata["model_version"] == f"v{number}"
        with torch.no_grad():
            torch.testing.assert_close(restored.score(users, items), original.score(users, items))
        assert (
            restored.select(users[0], items, 4)
            == torch.topk(original.score(users[:1], items)[0], 4).indices.tolist()
        )

    random_path = tmp_path / "random.pt"
    RandomPolicy(seed=3).save(random_path)
    torch.testing.assert_close(
        load_slate_policy(random_path).score(users, items), RandomPolicy(seed=3).score(users, items)
    )
