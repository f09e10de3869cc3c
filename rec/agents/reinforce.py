"""REINFORCE with the top-K off-policy correction, trained in the batched simulator.

The policy is a softmax over every service (`rec.policy.TwoTowerPolicy`); a slate of K is K
draws without replacement (Gumbel-top-K). Each shown service's log-probability is pushed by
the discounted return-to-go minus a baseline, optionally weighted by
lambda_K = K (1 - pi)^(K - 1) (Chen et al. 2019, "Top-K Off-Policy Correction for a
REINFORCE Recommender System"), which accounts for a service appearing in a slate of K.
The baseline is, by default, the return-to-go of the same user's twin: every sampled user is
played twice per episode, so who the user is (how active, how interested) cancels out of the
advantage, leaving what the slates changed. Rewards are, by default, each day's expected
reward given the state and the slate, which the environment computes exactly.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from rec.policy import (
    SlatePolicy,
    TwoTowerPolicy,
    gumbel_top_k,
    item_feature_matrix,
    user_feature_matrix,
)
from rec.sim.engine import SimEnv, UserState

logger = logging.getLogger(__name__)


@dataclass
class ReinforceArgs:
    """Knobs of one REINFORCE training run."""

    seed: int = 0
    """Seed of the policy initialisation, the slate draws and the environment."""
    num_updates: int = 150
    """Policy-gradient updates; each plays one episode for a fresh batch of users."""
    batch_users: int = 1024
    """Users simulated in parallel per episode."""
    slate_size: int = 5
    """K, services shown per user and day."""
    gamma: float = 0.95
    """Discount of the return-to-go, per simulated day."""
    learning_rate: float = 3e-3
    """Adam step size."""
    entropy_coef: float = 0.05
    """Weight of the entropy bonus of the softmax over all services."""
    temperature: float = 1.0
    """Slates are drawn from softmax(scores / temperature); below 1 the sampled slates stay
    close to the greedy top K that is evaluated and published."""
    topk_correction: bool = True
    """Weight each shown service's log-probability gradient by lambda_K = K (1 - pi)^(K-1)."""
    paired_baseline: bool = True
    """Play every sampled user twice per episode and use each copy's twin's return-to-go as
    its baseline (leave-one-out), so that who the user is cancels out of the advantage."""
    normalize_advantages: bool = True
    """Divide advantages by their batch standard deviation."""
    max_grad_norm: float = 1.0
    """Gradient clipping threshold."""
    expected_rewards: bool = True
    """Learn from each day's expected reward given the state and slate (where the
    environment reports one) rather than the drawn reward: same mean, less noise."""
    embed_dim: int = 16
    """Size of the user / service embedding of a new policy."""
    hidden_dim: int = 64
    """Width of the user MLP of a new policy."""
    eval_users: int = 1024
    """Users in the final greedy evaluation."""
    log_every: int = 10
    """Updates between two log lines."""


def user_features_of(state: UserState) -> torch.Tensor:
    """(B, 2T + 1) policy input of the users in `state`."""
    return user_feature_matrix(state.interest, state.strength, state.signup)


def discounted_returns(rewards: torch.Tensor, gamma: float) -> torch.Tensor:
    """(B, H) discounted return-to-go of (B, H) daily rewards."""
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for day in reversed(range(rewards.shape[1])):
        running = rewards[:, day] + gamma * running
        returns[:, day] = running
    return returns


def topk_correction_weight(log_pi: torch.Tensor, k: int) -> torch.Tensor:
    """lambda_K = K (1 - pi)^(K - 1) of Chen et al. 2019, treated as a constant."""
    pi = log_pi.detach().exp()
    return k * (1.0 - pi).pow(k - 1)


@torch.no_grad()
def evaluate_policy(
    env: SimEnv, policy: SlatePolicy, n_users: int, slate_size: int, seed: int = 12345
) -> float:
    """Mean undiscounted episode return when every user is shown the policy's top K.

    Each day counts its expected reward given the state and the slate, where the environment
    reports one. The environment is reseeded, so policies evaluated with the same seed meet
    the same users on day 0.
    """
    env.seed(seed)
    item_features = item_feature_matrix(
        env.catalogue.topic, env.catalogue.numeric, env.population.n_topics
    )
    state = env.reset(env.sample_users(n_users))
    total = torch.zeros(n_users, device=env.device)
    while not env.done:
        scores = policy.score(user_features_of(state), item_features)
        slates = torch.topk(scores, slate_size, dim=1).indices
        state, reward, info = env.step(slates)
        total += info.get("expected_reward", reward)
    return total.mean().item()


def train_reinforce(
    env: SimEnv, policy: TwoTowerPolicy | None = None, args: ReinforceArgs | None = None
) -> tuple[TwoTowerPolicy, dict[str, Any]]:
    """Train (or keep training) a softmax slate policy in the simulator.

    Args:
        env: the environment; its horizon is the episode length.
        policy: a previous policy to continue from (warm start), or None for a new one.
        args: the knobs; defaults when omitted.

    Returns:
        The trained policy (eval mode), and metrics: `learning_curve` (mean episode return
        per update, on the sampled slates), `losses/policy`, `losses/entropy`, `charts/SPS`
        (user-days simulated per second) and `final_mean_return` (greedy top-K evaluation).
    """
    args = args or ReinforceArgs()
    torch.manual_seed(args.seed)
    env.seed(args.seed)
    n_topics = env.population.n_topics
    n_numeric = env.catalogue.numeric.shape[1]
    if policy is None:
        policy = TwoTowerPolicy(n_topics, n_numeric, args.embed_dim, args.hidden_dim)
    policy = policy.to(env.device).train()
    optimizer = torch.optim.Adam(policy.parameters(), lr=args.learning_rate)
    slate_generator = torch.Generator(device=env.device).manual_seed(args.seed + 1)
    item_features = item_feature_matrix(env.catalogue.topic, env.catalogue.numeric, n_topics)
    k = args.slate_size

    curve: list[float] = []
    policy_losses: list[float] = []
    entropies: list[float] = []
    started = time.perf_counter()
    user_days = 0
    for update in range(1, args.num_updates + 1):
        if args.paired_baseline:
            half = env.sample_users(max(args.batch_users // 2, 1))
            state = env.reset(torch.cat([half, half]))
        else:
            state = env.reset(env.sample_users(args.batch_users))
        weighted_log_pi, rewards, shown, entropy = [], [], [], []
        while not env.done:
            logits = policy.score(user_features_of(state), item_features) / args.temperature
            log_pi = torch.log_softmax(logits, dim=1)
            slates = gumbel_top_k(logits.detach(), k, slate_generator)
            slate_log_pi = log_pi.gather(1, slates)
            if args.topk_correction and k > 1:
                slate_log_pi = topk_correction_weight(slate_log_pi, k) * slate_log_pi
            weighted_log_pi.append(slate_log_pi.sum(dim=1))
            entropy.append(-(log_pi.exp() * log_pi).sum(dim=1).mean())
            shown.append(state.active.float())
            state, reward, info = env.step(slates)
            if args.expected_rewards and "expected_reward" in info:
                reward = info["expected_reward"]
            rewards.append(reward)

        # Limitation: every service of a slate is credited with the whole return-to-go
        # (clicked or not), which makes the gradient noisier than it needs to be.
        reward_matrix = torch.stack(rewards, dim=1)
        returns = discounted_returns(reward_matrix, args.gamma)
        if args.paired_baseline:
            twin = returns.roll(returns.shape[0] // 2, dims=0)
            advantages = returns - twin
        else:
            advantages = returns - returns.mean(dim=0, keepdim=True)
        if args.normalize_advantages:
            advantages = advantages / (advantages.std() + 1e-8)
        mask = torch.stack(shown, dim=1)
        policy_loss = -(torch.stack(weighted_log_pi, dim=1) * advantages * mask).sum()
        policy_loss = policy_loss / mask.sum().clamp(min=1.0)
        entropy_bonus = torch.stack(entropy).mean()
        loss = policy_loss - args.entropy_coef * entropy_bonus

        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
        optimizer.step()

        user_days += reward_matrix.numel()
        curve.append(reward_matrix.sum(dim=1).mean().item())
        policy_losses.append(policy_loss.item())
        entropies.append(entropy_bonus.item())
        if update % args.log_every == 0 or update == args.num_updates:
            logger.info(
                "update %d: charts/episodic_return=%.3f losses/policy=%.4f "
                "losses/entropy=%.3f charts/SPS=%.0f",
                update,
                curve[-1],
                policy_losses[-1],
                entropies[-1],
                user_days / (time.perf_counter() - started),
            )

    seconds = time.perf_counter() - started
    policy.eval()
    final_return = evaluate_policy(env, policy, args.eval_users, k, seed=args.seed + 2)
    logger.info(
        "REINFORCE: %d updates in %.1f s (%.0f user-days/s), greedy mean return %.3f",
        args.num_updates,
        seconds,
        user_days / seconds,
        final_return,
    )
    metrics = {
        "learning_curve": curve,
        "losses/policy": policy_losses,
        "losses/entropy": entropies,
        "charts/SPS": user_days / seconds,
        "train_seconds": seconds,
        "final_mean_return": final_return,
    }
    return policy, metrics
