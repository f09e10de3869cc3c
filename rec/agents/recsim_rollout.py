"""What the agents trained in the `recsim` preset share: batched rollouts, returns, curves.

A rollout plays a batch of whole episodes in `rec.sim.recsim.RecSimEnv` with a slate chooser
and keeps every step as (steps, episodes, ...) tensors with an `alive` mask, so an agent can
compute its targets backwards in time and then learn from the steps in any order.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rec.policy import SlatePolicy
from rec.sim.recsim import RecSimConfig, RecSimEnv, ScoringSlatePolicy, evaluate

logger = logging.getLogger(__name__)

Chooser = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""(interest (B, T), candidates (B, C)) -> (slates (B, K), a per-row figure to keep (B,))."""


@dataclass
class Rollout:
    """A batch of finished episodes, step by step; rows where `alive` is False are padding."""

    interest: torch.Tensor
    """(S, B, T) the users' interest before each step."""
    candidates: torch.Tensor
    """(S, B, C) long cluster of each candidate."""
    slates: torch.Tensor
    """(S, B, K) candidate positions shown."""
    choice: torch.Tensor
    """(S, B) slate position clicked, -1 for none."""
    reward: torch.Tensor
    """(S, B) watch time."""
    alive: torch.Tensor
    """(S, B) bool, the episode was running at this step."""
    kept: torch.Tensor
    """(S, B) the chooser's figure of each step (e.g. the value of the chosen slate)."""
    budget: torch.Tensor
    """(S, B) the hidden budget before each step: for control variates in training only."""

    @property
    def user_steps(self) -> int:
        return int(self.alive.sum())

    def episode_returns(self) -> torch.Tensor:
        """(B,) undiscounted return of each episode."""
        return self.reward.sum(dim=0)


def play_rollout(env: RecSimEnv, n_episodes: int, choose: Chooser) -> Rollout:
    """Play `n_episodes` episodes to the end, asking `choose` only for the running rows.

    Args:
        env: the preset; built with `compact_below=0` so that rows keep their episode.
        n_episodes: B.
        choose: picks the slates of the running rows.

    Returns:
        The episodes' steps.
    """
    env.reset(n_episodes)
    k = env.config.slate_size
    idle_slate = torch.arange(k, device=env.device).expand(n_episodes, k)
    steps: list[tuple[torch.Tensor, ...]] = []
    while not env.done:
        alive = env.alive.clone()
        rows = alive.nonzero().squeeze(1)
        interest = env.users.interest.clone()
        budget = env.users.budget.clone()
        candidates = env.candidates
        chosen, figure = choose(interest[rows], candidates[rows])
        slates = idle_slate.clone()
        slates[rows] = chosen
        kept = torch.zeros(n_episodes, device=env.device)
        kept[rows] = figure.float()
        reward, info = env.step(slates)
        steps.append((interest, candidates, slates, info["choice"], reward, alive, kept, budget))
    return Rollout(*(torch.stack(parts) for parts in zip(*steps, strict=True)))


def lambda_returns(
    rollout: Rollout, gamma: float, td_lambda: float = 1.0, values: torch.Tensor | None = None
) -> torch.Tensor:
    """(S, B) lambda-returns: G_t = r_t + gamma [(1 - lambda) V_{t+1} + lambda G_{t+1}].

    V_{t+1} is the value of the step taken next (on-policy, SARSA-style), zero after the end.
    With lambda = 1 (or no values) this is the Monte Carlo return-to-go.
    """
    reward, alive = rollout.reward, rollout.alive.float()
    returns = torch.zeros_like(reward)
    running = torch.zeros_like(reward[0])
    for step in reversed(range(reward.shape[0])):
        if step + 1 < reward.shape[0]:
            following = running
            if values is not None and td_lambda < 1.0:
                following = (1.0 - td_lambda) * values[step + 1] + td_lambda * running
            running = reward[step] + gamma * alive[step + 1] * following
        else:
            running = reward[step]
        returns[step] = running * alive[step]
    return returns


def step_baseline(returns: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    """(S, 1) mean return-to-go of the running episodes at each step index.

    The step index is known to the agent and independent of the action taken, so subtracting
    this leaves the ranking of actions unchanged while removing much of the variance that the
    hidden budget puts into returns (episodes late in their budget have little left to earn).
    """
    alive = alive.float()
    return ((returns * alive).sum(dim=1) / alive.sum(dim=1).clamp(min=1.0)).unsqueeze(1)


class BudgetCritic(torch.nn.Module):
    """Training-only value of a running episode from its interest, hidden budget and step.

    The policies never see the budget; the critic does, as in asymmetric actor-critic
    training, because the budget is what makes returns differ between users of the same
    interest. Before a step, the budget does not depend on the (budget-blind) action, so
    advantages taken against this critic rank actions as the plain returns would, with far
    less variance; and its slope in the budget is how a cluster's hidden quality (the budget
    refill of its videos) reaches the agent within one step.
    """

    def __init__(self, n_topics: int, hidden_dim: int = 64, scale: float = 100.0) -> None:
        """Args: n_topics: T; hidden_dim: width; scale: the network outputs values / scale."""
        super().__init__()
        self.n_topics, self.hidden_dim, self.scale = n_topics, hidden_dim, scale
        self.net = torch.nn.Sequential(
            torch.nn.Linear(n_topics + 2, hidden_dim), torch.nn.ReLU(),
            torch.nn.Linear(hidden_dim, hidden_dim), torch.nn.ReLU(),
            torch.nn.Linear(hidden_dim, 1),
        )

    def forward(self, interest: torch.Tensor, budget: torch.Tensor, step: torch.Tensor):
        """(N,) value / scale of N (interest, budget, step) states."""
        features = torch.cat(
            [interest, budget.unsqueeze(-1) / 200.0, step.unsqueeze(-1) / 100.0], dim=-1
        )
        return self.net(features).squeeze(-1)


def _step_index(rollout: Rollout) -> torch.Tensor:
    steps = torch.arange(len(rollout.reward), dtype=rollout.reward.dtype)
    return steps.unsqueeze(1).expand_as(rollout.reward)


def fit_critic(
    critic: BudgetCritic,
    optimizer: torch.optim.Optimizer,
    rollout: Rollout,
    returns: torch.Tensor,
    epochs: int = 2,
    minibatch: int = 8192,
) -> float:
    """Regress the critic on the running steps' returns; the last minibatch's loss."""
    rows = rollout.alive.flatten().nonzero().squeeze(1)
    interest = rollout.interest.flatten(0, 1)
    budget, step = rollout.budget.flatten(), _step_index(rollout).flatten()
    target = returns.flatten() / critic.scale
    loss = torch.zeros(())
    for _ in range(epochs):
        order = rows[torch.randperm(len(rows))]
        for first in range(0, len(order), minibatch):
            batch = order[first:first + minibatch]
            predicted = critic(interest[batch], budget[batch], step[batch])
            loss = torch.nn.functional.mse_loss(predicted, target[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return loss.item()


def training_state(
    agent: str,
    critic: BudgetCritic,
    critic_optimizer: torch.optim.Optimizer,
    policy_optimizer: torch.optim.Optimizer,
    user_steps: int,
) -> dict[str, Any]:
    """What a warm start needs beyond the policy: the critic and both optimisers' moments.

    The dict holds only tensors, numbers and strings, so `SlatePolicy.save(training=...)`
    writes it into the policy file and `torch.load(weights_only=True)` reads it back.
    """
    return {
        "agent": agent,
        "user_steps": int(user_steps),
        "critic_config": {"n_topics": critic.n_topics, "hidden_dim": critic.hidden_dim,
                          "scale": critic.scale},
        "critic": {k: v.detach().cpu().clone() for k, v in critic.state_dict().items()},
        "critic_optimizer": critic_optimizer.state_dict(),
        "policy_optimizer": policy_optimizer.state_dict(),
    }


def restore_training_state(
    state: dict[str, Any],
    agent: str,
    critic: BudgetCritic,
    critic_optimizer: torch.optim.Optimizer,
    policy_optimizer: torch.optim.Optimizer,
    learning_rate: float,
) -> None:
    """Load a `training_state` into a fresh critic and optimisers (in place).

    The optimisers keep their moments but take `learning_rate`, the new run's step size.

    Raises:
        ValueError: the state was saved by another agent or for another critic shape.
    """
    if state.get("agent") != agent:
        raise ValueError(f"the training state is {state.get('agent')!r}'s, not {agent!r}'s")
    config = state["critic_config"]
    if (config["n_topics"], config["hidden_dim"]) != (critic.n_topics, critic.hidden_dim):
        raise ValueError(f"the saved critic has shape {config}, the new one "
                         f"{(critic.n_topics, critic.hidden_dim)}")
    critic.load_state_dict(state["critic"])
    for optimizer, key in ((critic_optimizer, "critic_optimizer"),
                           (policy_optimizer, "policy_optimizer")):
        optimizer.load_state_dict(state[key])
        for group in optimizer.param_groups:
            group["lr"] = learning_rate


@torch.no_grad()
def shrink_and_perturb(module: torch.nn.Module, shrink: float, noise: float,
                       generator: torch.Generator) -> None:
    """Scale a continued network's weights by `shrink` and add N(0, noise^2) (in place).

    Warm-started networks tend to settle near their old solution and fit new data worse
    than a fresh start (Ash and Adams 2020, "On Warm-Starting Neural Network Training");
    shrinking the weights and adding a little noise keeps what was learned while restoring
    the gradients' reach.
    """
    for weight in module.parameters():
        weight.mul_(shrink).add_(noise * torch.randn(weight.shape, generator=generator))


@torch.no_grad()
def critic_values(critic: BudgetCritic, rollout: Rollout) -> torch.Tensor:
    """(S, B) the critic's values of every step's state, zero where the episode has ended."""
    values = critic(rollout.interest, rollout.budget, _step_index(rollout)) * critic.scale
    return values * rollout.alive


def random_slates(
    n_rows: int, n_candidates: int, k: int, generator: torch.Generator
) -> torch.Tensor:
    """(n_rows, k) distinct candidate positions, uniformly at random."""
    keys = torch.rand(n_rows, n_candidates, generator=generator, device=generator.device)
    return torch.topk(keys, k, dim=1).indices


def greedy_return(
    policy: SlatePolicy, episodes: int, seed: int, config: RecSimConfig | None = None
) -> dict[str, float]:
    """`rec.sim.recsim.evaluate` of the policy's greedy slates (mean return, SEM, CTR, ...)."""
    return evaluate(ScoringSlatePolicy(policy.eval()), episodes, seed=seed, config=config)


def save_learning_curve(
    path: str | Path,
    steps: list[int],
    returns: list[float],
    title: str,
    references: dict[str, float] | None = None,
    greedy: list[float] | None = None,
) -> Path:
    """Plot mean episode return against user-steps trained, with reference lines, as a PNG.

    `greedy`, where given, is a second series beside `returns` (NaN where not measured): the
    greedy policy's return on validation episodes.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    axes.plot(steps, returns, label="training episodes (exploring)")
    if greedy is not None:
        axes.plot(steps, greedy, marker=".", label="greedy, validation episodes")
    for offset, (name, value) in enumerate(sorted((references or {}).items())):
        axes.axhline(value, linestyle="--", color=f"C{offset + 1}", label=f"{name} {value:.0f}")
    axes.set_xlabel("user-steps trained")
    axes.set_ylabel("mean episode return (watch time)")
    axes.set_title(title)
    axes.legend(loc="lower right")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    logger.info("learning curve written to %s", path)
    return path


def critic_advantages(
    critic: BudgetCritic,
    optimizer: torch.optim.Optimizer,
    rollout: Rollout,
    gamma: float,
    td_lambda: float,
    epochs: int,
    minibatch: int,
) -> torch.Tensor:
    """(S, B) lambda-returns minus the critic's state values, after fitting the critic.

    The critic is first fitted to the rollout's Monte Carlo returns; its values then serve
    both as the bootstrap of the lambda-returns and as the per-state baseline.
    """
    fit_critic(critic, optimizer, rollout, lambda_returns(rollout, gamma), epochs, minibatch)
    state_values = critic_values(critic, rollout)
    return lambda_returns(rollout, gamma, td_lambda, state_values) - state_values
