"""A one-step lookahead of the fitted environment, and distilling it into a slate policy.

The lookahead values a service for a user as the reward its click would bring today plus what
its booking is worth later: a booking with an expert changes the user's daily visit
probability (`rec.sim.engine.ActivityModel`), and each extra expected visit is worth the
reward of an average visit over the days left. It reads the environment's own models (choice,
booking, activity), so it knows the experts, which a published policy does not.

`distill` fits a `rec.policy.TwoTowerPolicy` to the lookahead's softmax over services, so that
REINFORCE starts from a policy that already ranks by long-term value rather than from noise.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from rec.policy import TwoTowerPolicy, item_feature_matrix, user_feature_matrix
from rec.sim.engine import SimEnv, UserState

logger = logging.getLogger(__name__)


@dataclass
class DistillArgs:
    """Knobs of fitting a policy to the lookahead."""

    steps: int = 150
    """Adam steps, each on a fresh batch of population users."""
    batch_users: int = 512
    """Users per step."""
    pool_users: int = 4096
    """Population users whose lookahead values are computed once and drawn from each step."""
    learning_rate: float = 1e-2
    """Adam step size."""
    temperature: float = 0.5
    """The target is softmax(log value / temperature): lower puts more weight on the top."""
    seed: int = 0
    """Seed of the user draws."""


class Lookahead:
    """Long-term value of showing each service to each user, from the environment's models."""

    def __init__(self, env: SimEnv, reward_per_visit: float, gamma: float = 0.95) -> None:
        """Set up the lookahead.

        Args:
            env: the fitted environment whose choice, booking and activity models it reads.
            reward_per_visit: the expected reward of one visit (e.g. bookings per visit in
                the logs); what one more expected visit is worth.
            gamma: the discount of later days.
        """
        self.env = env
        remaining = torch.arange(1, max(env.horizon, 1), dtype=torch.float32)
        # An extra unit of daily visit probability from tomorrow to the episode's end, with
        # the booking equally likely on any day of it.
        days_left = (gamma ** remaining).sum() / 2.0
        self.future_value = float(reward_per_visit * days_left)

    @torch.no_grad()
    def values(self, state: UserState) -> torch.Tensor:
        """(B, S) value of each service shown alone at the top of the slate."""
        env, items = self.env, self.env.catalogue
        utility = env.choice_model.all_item_utilities(
            state.interest, state.strength, state.signup, items.topic, items.numeric,
            items.expert)
        click = torch.sigmoid(utility)
        every = torch.arange(items.n_items, device=state.device).expand(state.n_users, -1)
        booking = env.response.booking_probability(every, state, items)
        later = 0.0
        if env.activity_model is not None:
            later = self.future_value * env.activity_model.effect.to(click.device)
        per_booking = env.response.booking_reward(every) + later
        return click * (env.response.click_value + booking * per_booking)


def distill(env: SimEnv, lookahead: Lookahead, policy: TwoTowerPolicy | None = None,
            args: DistillArgs | None = None) -> tuple[TwoTowerPolicy, dict]:
    """Fit a two-tower policy's softmax to softmax(log value / temperature) of the lookahead.

    Args:
        env: the environment whose population the users are drawn from.
        lookahead: the values to imitate.
        policy: the policy to fit (a new one when None).
        args: the knobs.

    Returns:
        The fitted policy (eval mode) and metrics: `losses/distill` (first and last
        cross-entropy), `top1_agreement` (share of users whose best service is the
        lookahead's) and `seconds`.
    """
    args = args or DistillArgs()
    started = time.perf_counter()
    n_topics = env.population.n_topics
    if policy is None:
        torch.manual_seed(args.seed)
        policy = TwoTowerPolicy(n_topics, env.catalogue.numeric.shape[1])
    policy.train()
    items = item_feature_matrix(env.catalogue.topic, env.catalogue.numeric, n_topics)
    generator = torch.Generator().manual_seed(args.seed)
    optimizer = torch.optim.Adam(policy.parameters(), lr=args.learning_rate)
    pool = torch.randperm(env.population.n_users, generator=generator)[:args.pool_users]
    pool_state = env.population.index(pool)
    pool_features = user_feature_matrix(pool_state.interest, pool_state.strength,
                                        pool_state.signup)
    target_logits = lookahead.values(pool_state).clamp(min=1e-12).log() / args.temperature
    losses = []
    for _ in range(args.steps):
        rows = torch.randint(len(pool), (args.batch_users,), generator=generator)
        target = torch.softmax(target_logits[rows], dim=1)
        logits = policy.score(pool_features[rows], items)
        loss = -(target * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    policy.eval()
    with torch.no_grad():
        state = env.population.index(torch.arange(min(env.population.n_users, 2048)))
        features = user_feature_matrix(state.interest, state.strength, state.signup)
        agree = (policy.score(features, items).argmax(1)
                 == lookahead.values(state).argmax(1)).float().mean().item()
    metrics = {"losses/distill": [losses[0], losses[-1]] if losses else [],
               "top1_agreement": agree, "seconds": time.perf_counter() - started}
    logger.info("distilled the lookahead in %d steps (%.1f s): loss %.3f -> %.3f, top-1 agrees"
                " for %.0f%% of users", args.steps, metrics["seconds"],
                losses[0] if losses else float("nan"), losses[-1] if losses else float("nan"),
                100 * agree)
    return policy, metrics
