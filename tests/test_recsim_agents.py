"""Agents of the recsim preset (SlateQ, top-K REINFORCE), their policy files and the gate."""

from __future__ import annotations

import contextlib
import io
import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from rec.agents.baselines import MyopicPolicy, RandomPolicy
from rec.agents.recsim_rollout import (
    BudgetCritic,
    lambda_returns,
    play_rollout,
    random_slates,
    restore_training_state,
    shrink_and_perturb,
)
from rec.agents.recsim_train import WARM_START_ARGS
from rec.agents.slateq import SlateQArgs, train_slateq
from rec.agents.topk_reinforce import (
    TopKReinforceArgs,
    candidate_logits,
    corrected_weight,
    topk_correction_weight,
    train_topk_reinforce,
)
from rec.cli import main as rec_main
from rec.evaluate import decide, gate, paired_difference
from rec.policy import (
    CandidateSoftmaxPolicy,
    SlateQPolicy,
    load_slate_policy,
    load_training_state,
)
from rec.sim.recsim import RecSimEnv, evaluate, make_policy

torch.set_num_threads(1)

RANDOM_RETURN = 153.0
"""The random policy's mean return in the preset (300 episodes, seed 0)."""


def test_topk_correction_weight_and_capped_ratio():
    pi = torch.tensor([0.0, 0.5, 0.9])
    assert torch.allclose(topk_correction_weight(pi, 2), torch.tensor([2.0, 1.0, 0.2]))
    assert torch.allclose(topk_correction_weight(pi, 1), torch.ones(3))

    log_pi = torch.log(torch.tensor([0.5, 0.5, 0.2]))
    log_beta = torch.log(torch.tensor([0.25, 0.01, 0.4]))
    weight = corrected_weight(log_pi, log_beta, k=2, cap=5.0)
    # ratios 2, 50 (capped to 5), 0.5; lambda_2 = 2 (1 - pi) = 1, 1, 1.6
    assert torch.allclose(weight, torch.tensor([2.0, 5.0, 0.8]))
    assert torch.allclose(corrected_weight(log_pi, log_beta, 2, 5.0, topk=False),
                          torch.tensor([2.0, 5.0, 0.5]))
    log_pi.requires_grad_(True)
    assert not corrected_weight(log_pi, log_beta, 2, 5.0).requires_grad


def test_lambda_returns_stop_at_the_episode_end():
    env = RecSimEnv(seed=3, compact_below=0.0)
    generator = torch.Generator().manual_seed(0)
    rollout = play_rollout(
        env, 64, lambda u, c: (random_slates(len(u), 10, 2, generator), torch.zeros(len(u))))
    returns = lambda_returns(rollout, gamma=1.0)
    assert torch.allclose(returns[0], rollout.reward.sum(dim=0))
    assert (returns[~rollout.alive] == 0).all()
    # Each episode's first step is alive and its return is the whole episode's.
    assert rollout.alive[0].all()


@pytest.fixture(scope="module")
def slateq_policy():
    args = SlateQArgs(seed=0, total_steps=150_000, episodes_per_batch=256, eval_episodes=200)
    return train_slateq(args, progress=False)


@pytest.fixture(scope="module")
def reinforce_policy():
    args = TopKReinforceArgs(seed=0, total_steps=200_000, episodes_per_batch=256,
                             learning_rate=1e-3, eval_episodes=200, validation_episodes=200)
    return train_topk_reinforce(args, progress=False)


def test_shrink_and_perturb_scales_weights_and_adds_seeded_noise():
    torch.manual_seed(0)
    net = torch.nn.Linear(64, 64)
    before = [w.clone() for w in net.parameters()]
    shrink_and_perturb(net, 0.8, 0.0, torch.Generator().manual_seed(1))
    assert all(torch.allclose(w, 0.8 * b) for w, b in zip(net.parameters(), before, strict=True))

    copies = [torch.nn.Linear(64, 64) for _ in range(2)]
    for copy in copies:
        copy.load_state_dict(net.state_dict())
        shrink_and_perturb(copy, 1.0, 0.01, torch.Generator().manual_seed(2))
    assert torch.equal(copies[0].weight, copies[1].weight)
    noise = (copies[0].weight - net.weight).flatten()
    assert abs(noise.std().item() - 0.01) < 0.001 and abs(noise.mean().item()) < 0.001


def test_candidate_logits_match_the_policy_on_one_hot_candidates():
    torch.manual_seed(0)
    policy = CandidateSoftmaxPolicy(20)
    interest = torch.rand(8, 20) * 2 - 1
    candidates = torch.randint(20, (8, 10))
    docs = torch.nn.functional.one_hot(candidates, 20).float()
    for fast, plain in zip(candidate_logits(policy, interest, candidates),
                           policy.logits(interest, docs), strict=True):
        assert torch.allclose(fast, plain, atol=1e-5)


def _train_cli(agent: str, out, *extra: str) -> dict:
    """`rec sim train` in this process for one batch (the smallest budget); its summary."""
    argv = ["sim", "train", "--preset", "recsim", "--agent", agent, "--out", str(out),
            "--steps", "1", "--seed", "0", "--threads", "1", "--eval-episodes", "50", *extra]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert rec_main(argv) == 0
    return json.loads(printed.getvalue().strip().splitlines()[-1])


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """Each agent trained by `rec sim train` for one batch, then warm-started from its file."""
    runs = {}
    for agent in ("slateq", "reinforce"):
        folder = tmp_path_factory.mktemp(agent)
        first, second = folder / "first.pt", folder / "second.pt"
        summary = _train_cli(agent, first)
        assert summary["policy"] == str(first) and summary["user_steps"] > 0
        saved = load_training_state(first)
        _train_cli(agent, second, "--init", str(first))
        runs[agent] = (first, second, saved)
    return runs


@pytest.mark.parametrize("agent", ["slateq", "reinforce"])
def test_cli_trains_saves_the_critic_and_warm_starts_from_the_file(agent, cli_runs):
    first, second, saved = cli_runs[agent]
    assert first.with_suffix(".png").stat().st_size > 0
    assert first.stat().st_size < 1_000_000
    policy = load_slate_policy(first)
    assert policy.metadata["agent"] == agent and policy.metadata["user_steps"] > 0
    user = torch.rand(20) * 2 - 1
    docs = torch.nn.functional.one_hot(torch.arange(10) * 2, 20).float()
    assert len(set(policy.select(user, docs, 2))) == 2

    # The file's critic comes back with the values it was saved with.
    assert saved["agent"] == agent and saved["user_steps"] == policy.metadata["user_steps"]
    critic = BudgetCritic(**saved["critic_config"])
    optimizer = torch.optim.Adam(critic.parameters())
    policy_optimizer = torch.optim.Adam(load_slate_policy(first).parameters())
    restore_training_state(saved, agent, critic, optimizer, policy_optimizer, 1e-4)
    states = (torch.rand(64, 20) * 2 - 1, torch.rand(64) * 200, torch.arange(64.0))
    expected = BudgetCritic(**saved["critic_config"])
    expected.load_state_dict(saved["critic"])
    assert torch.equal(critic(*states), expected(*states))
    assert all(group["lr"] == 1e-4 for group in optimizer.param_groups)

    # The warm run continued that state: its step counts add up, its optimisers' moments
    # count the first run's updates too, and its critic moved on from the saved one.
    resumed = load_training_state(second)
    warm_policy = load_slate_policy(second)
    assert warm_policy.metadata["warm_start"] == str(first)
    assert resumed["user_steps"] == saved["user_steps"] + warm_policy.metadata["user_steps"]
    knobs = replace(SlateQArgs() if agent == "slateq" else TopKReinforceArgs(),
                    **WARM_START_ARGS[agent])
    warm_updates = knobs.epochs * math.ceil(warm_policy.metadata["user_steps"] / knobs.minibatch)
    for key in ("critic_optimizer", "policy_optimizer"):
        before = saved[key]["state"][0]["step"].item()
        after = resumed[key]["state"][0]["step"].item()
        assert before > 0 and after == before + warm_updates
    resumed_critic = BudgetCritic(**resumed["critic_config"])
    resumed_critic.load_state_dict(resumed["critic"])
    assert not torch.equal(resumed_critic(*states), expected(*states))


def test_warm_start_refuses_another_agents_file(cli_runs, tmp_path):
    slateq_file = cli_runs["slateq"][0]
    with pytest.raises(ValueError, match="slateq"):
        _train_cli("reinforce", tmp_path / "x.pt", "--init", str(slateq_file))


@pytest.mark.parametrize("trained", ["slateq_policy", "reinforce_policy"])
def test_short_training_beats_random(trained, request, tmp_path):
    policy, metrics = request.getfixturevalue(trained)
    assert len(metrics["curve/return"]) == len(metrics["curve/steps"]) >= 2
    assert metrics["user_steps"] >= metrics["args"]["total_steps"]

    path = tmp_path / "policy.pt"
    policy.save(path)
    result = evaluate(make_policy(str(path)), 500, seed=0)
    assert result["return"] > RANDOM_RETURN + 15.0, result


@pytest.mark.parametrize("kind", [CandidateSoftmaxPolicy, SlateQPolicy])
def test_saved_policy_selects_k_distinct_candidates(kind, tmp_path):
    torch.manual_seed(0)
    policy = kind(20)
    path = tmp_path / "p.pt"
    policy.save(path, metadata={"model_version": "x"})
    loaded = load_slate_policy(path)
    assert type(loaded) is kind and loaded.metadata == {"model_version": "x"}

    user = torch.rand(20) * 2 - 1
    docs = torch.nn.functional.one_hot(torch.tensor([3, 3, 7, 1, 19, 0, 5, 5, 12, 8]), 20)
    for k in (1, 2, 4):
        chosen = loaded.select(user, docs.float(), k)
        assert len(chosen) == len(set(chosen)) == k
        assert all(0 <= c < 10 for c in chosen)
    assert loaded.select(user, docs.float(), 2) == policy.select(user, docs.float(), 2)


def test_slateq_picks_the_best_slate_by_enumeration():
    policy = SlateQPolicy(20)
    q = torch.tensor([[5.0, 1.0, 9.0, 3.0]])
    q_none = torch.tensor([2.0])
    weights = torch.tensor([[2.0, 2.0, 0.5, 1.0]])
    slate, value = policy.best_slates(q, q_none, weights, 2)
    best = max(
        ((a, b) for a in range(4) for b in range(a + 1, 4)),
        key=lambda s: (sum(weights[0, i] * q[0, i] for i in s) + 2.0 * 2.0)
        / (sum(weights[0, i] for i in s) + 2.0))
    assert tuple(sorted(slate[0].tolist())) == best
    expected = policy.slate_value(q, q_none, weights, slate)
    assert math.isclose(value.item(), expected.item(), rel_tol=1e-6)


def test_paired_difference_and_decision():
    rng = np.random.default_rng(0)
    base = rng.normal(10.0, 3.0, 2000)
    better = paired_difference(base + 1.0 + rng.normal(0, 0.5, 2000), base, n_boot=300)
    assert better["ci"][0] > 0.5 and decide(better) == "promote"
    same = paired_difference(base, base, n_boot=300)
    assert same["ci"] == [0.0, 0.0] and decide(same) == "keep"
    noisy = paired_difference(base + rng.normal(0, 3.0, 2000), base, n_boot=300)
    assert decide(noisy, margin=1.0) == "keep"
    assert decide(None) == "promote"


def test_gate_promotes_a_better_challenger_and_refuses_an_equal_or_worse_one():
    from test_reinforce import SLATE_SIZE, _booking_env

    env = _booking_env()
    cold = env.population.interest.sum(dim=1) == 0
    myopic, random = MyopicPolicy(env.choice_model), RandomPolicy(seed=3)
    promoted = gate(env, myopic, random, {}, SLATE_SIZE, cold=cold)
    assert promoted["decision"] == "promote"
    assert promoted["difference"]["ci"][0] > 0
    figures = promoted["simulated"]["challenger"]
    assert 0 < figures["coverage"] <= 1 and figures["ctr"] > 0
    assert figures["cold_start_return"] == figures["cold_start_return"]  # not NaN

    assert gate(env, random, myopic, {}, SLATE_SIZE)["decision"] == "keep"
    assert gate(env, myopic, myopic, {}, SLATE_SIZE)["decision"] == "keep"
    first_night = gate(env, random, None, {"myopic": myopic}, SLATE_SIZE)
    assert first_night["decision"] == "promote" and first_night["difference"] is None
