"""SlateQ (Ie et al. 2019) trained on-policy with SARSA(lambda) targets in the `recsim` preset.

Item-wise values Q(user, item) (the return after the user clicks the item) and Q(user, none)
are combined through the known proportional choice model into slate values; the agent shows
the best of all K-subsets of the candidates (epsilon-greedy while training). After each batch
of whole episodes, the value of every step's outcome (the clicked item, or none) is regressed
on the lambda-return whose bootstrap is the value of the slate actually shown next.

Hidden quality is never observed, but a cluster's quality shows in how long episodes last
after its videos are watched (the budget refill), so the learned Q of a cluster carries it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from tqdm import tqdm

from rec.agents.recsim_rollout import (
    BudgetCritic,
    Rollout,
    critic_advantages,
    greedy_return,
    play_rollout,
    random_slates,
    restore_training_state,
    shrink_and_perturb,
    training_state,
)
from rec.policy import SlateQPolicy
from rec.sim.recsim import RecSimConfig, RecSimEnv

logger = logging.getLogger(__name__)


@dataclass
class SlateQArgs:
    """Knobs of one SlateQ training run in the recsim preset."""

    seed: int = 0
    """Seed of the network initialisation, the exploration and the training environment."""
    total_steps: int = 3_000_000
    """User-steps to simulate (all batches together)."""
    episodes_per_batch: int = 1024
    """Episodes played in parallel before each round of updates."""
    gamma: float = 1.0
    """Discount per step (the preset's return is undiscounted)."""
    td_lambda: float = 0.0
    """lambda of the on-policy targets: 0 bootstraps on the critic's value of the next state
    (one-step SARSA), 1 is the Monte Carlo return."""
    learning_rate: float = 1e-3
    """Adam step size."""
    epochs: int = 2
    """Passes over each batch's steps."""
    minibatch: int = 4096
    """Steps per gradient update."""
    epsilon_start: float = 0.3
    """Share of random slates at the start of training."""
    epsilon_end: float = 0.02
    """Share of random slates at the end (linear decay over the steps)."""
    hidden_dim: int = 64
    """Width of the value networks of a new policy."""
    max_grad_norm: float = 1.0
    """Gradient clipping threshold."""
    eval_episodes: int = 2000
    """Episodes of the final greedy evaluation (on a seed of its own)."""
    warm_shrink: float = 1.0
    """A continued policy's weights are multiplied by this before training."""
    warm_noise: float = 0.0
    """... and Gaussian noise of this standard deviation is added to them."""


def value_loss(policy: SlateQPolicy, rollout: Rollout, targets: torch.Tensor,
               rows: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the outcome's value against its target, on flat step indices."""
    interest = rollout.interest.flatten(0, 1)[rows]
    choice = rollout.choice.flatten()[rows]
    target = targets.flatten()[rows] / policy.config["value_scale"]
    clicked = choice >= 0
    slate = rollout.slates.flatten(0, 1)[rows]
    position = slate.gather(1, choice.clamp(min=0).unsqueeze(1))
    cluster = rollout.candidates.flatten(0, 1)[rows].gather(1, position)
    docs = torch.nn.functional.one_hot(cluster, policy.config["n_topics"]).float()
    scale = policy.config["value_scale"]
    item = policy.item_q(interest, docs).squeeze(1) / scale
    none = policy.none_q(interest) / scale
    predicted = torch.where(clicked, item, none)
    return torch.nn.functional.mse_loss(predicted, target)


def train_slateq(
    args: SlateQArgs | None = None,
    policy: SlateQPolicy | None = None,
    config: RecSimConfig | None = None,
    progress: bool = True,
    training: dict[str, Any] | None = None,
) -> tuple[SlateQPolicy, dict[str, Any]]:
    """Train (or keep training) a SlateQ policy in the recsim preset.

    Args:
        args: the knobs; defaults when omitted.
        policy: a policy to continue from (warm start), or None for a new one.
        config: the environment's constants; RecSim's defaults when omitted.
        progress: show a progress bar with steps per second and the running return.
        training: the training state saved with `policy` (`metrics["training"]` of an earlier
            run, or `rec.policy.load_training_state`): its critic and optimiser moments are
            continued instead of starting afresh.

    Returns:
        The policy (eval mode) and metrics: `curve/steps` and `curve/return` (mean return of
        each batch's exploring episodes), `losses/value`, `charts/SPS`, `train_seconds`,
        `eval/*` (greedy evaluation) and `training` (the state a later warm start continues
        from).
    """
    args = args or SlateQArgs()
    torch.manual_seed(args.seed)
    env = RecSimEnv(config, seed=args.seed + 10_007, compact_below=0.0)
    if policy is None:
        policy = SlateQPolicy(env.config.n_topics, args.hidden_dim)
    elif args.warm_shrink != 1.0 or args.warm_noise:
        shrink_and_perturb(policy, args.warm_shrink, args.warm_noise,
                           torch.Generator().manual_seed(args.seed + 3))
    optimizer = torch.optim.Adam(policy.parameters(), lr=args.learning_rate)
    critic = BudgetCritic(env.config.n_topics, args.hidden_dim)
    critic_optimizer = torch.optim.Adam(critic.parameters(), lr=args.learning_rate)
    if training is not None:
        restore_training_state(training, "slateq", critic, critic_optimizer, optimizer,
                               args.learning_rate)
    explore = torch.Generator().manual_seed(args.seed + 1)
    n_topics, k = env.config.n_topics, env.config.slate_size
    epsilon = args.epsilon_start

    def choose(interest: torch.Tensor, candidates: torch.Tensor) -> tuple[torch.Tensor, ...]:
        docs = torch.nn.functional.one_hot(candidates, n_topics).float()
        with torch.no_grad():
            q, weights = policy.item_q(interest, docs), policy.choice_weights(interest, docs)
            q_none = policy.none_q(interest)
            slates, _ = policy.best_slates(q, q_none, weights, k)
            rows = len(interest)
            random = random_slates(rows, candidates.shape[1], k, explore)
            slates = torch.where(torch.rand(rows, 1, generator=explore) < epsilon, random, slates)
            return slates, policy.slate_value(q, q_none, weights, slates)

    steps_done, curve_steps, curve_returns, losses = 0, [], [], []
    started = time.perf_counter()
    bar = tqdm(total=args.total_steps, desc="slateq", unit="step", disable=not progress)
    while steps_done < args.total_steps:
        epsilon = args.epsilon_start + (args.epsilon_end - args.epsilon_start) * min(
            1.0, steps_done / args.total_steps)
        policy.eval()
        rollout = play_rollout(env, args.episodes_per_batch, choose)
        # Outcome values are learned relative to the critic's value of the state before the
        # step: a constant per state leaves every slate comparison as it is (the choice
        # probabilities, none included, sum to 1).
        targets = critic_advantages(critic, critic_optimizer, rollout, args.gamma,
                                    args.td_lambda, args.epochs, args.minibatch)

        policy.train()
        alive_rows = rollout.alive.flatten().nonzero().squeeze(1)
        for _ in range(args.epochs):
            order = alive_rows[torch.randperm(len(alive_rows))]
            for first in range(0, len(order), args.minibatch):
                loss = value_loss(policy, rollout, targets, order[first:first + args.minibatch])
                optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
                optimizer.step()
                losses.append(loss.item())

        steps_done += rollout.user_steps
        curve_steps.append(steps_done)
        curve_returns.append(rollout.episode_returns().mean().item())
        sps = steps_done / (time.perf_counter() - started)
        bar.update(min(rollout.user_steps, args.total_steps - bar.n))
        bar.set_postfix(charts_return=f"{curve_returns[-1]:.1f}", eps=f"{epsilon:.2f}",
                        sps=f"{sps:.0f}")
        logger.debug("slateq: steps %d charts/episodic_return=%.2f losses/value=%.4f SPS=%.0f",
                     steps_done, curve_returns[-1], losses[-1], sps)
    bar.close()

    seconds = time.perf_counter() - started
    policy.eval()
    final = greedy_return(policy, args.eval_episodes, seed=args.seed + 20_011, config=config)
    logger.info("slateq: %d user-steps in %.1f s (%.0f/s), greedy return %.2f +- %.2f",
                steps_done, seconds, steps_done / seconds, final["return"], final["sem"])
    metrics = {
        "curve/steps": curve_steps,
        "curve/return": curve_returns,
        "losses/value": losses,
        "charts/SPS": steps_done / seconds,
        "train_seconds": seconds,
        "user_steps": steps_done,
        "eval/return": final["return"],
        "eval/sem": final["sem"],
        "eval/ctr": final["ctr"],
        "args": asdict(args),
        "training": training_state("slateq", critic, critic_optimizer, optimizer,
                                   steps_done + (training or {}).get("user_steps", 0)),
    }
    return policy, metrics
