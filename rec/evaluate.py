"""The nightly shipping decision: does tonight's challenger policy replace the champion?

Every policy (challenger, champion, random, popularity, myopic) plays the same users in the
simulator built from the fitted choice model, with the same seed, so returns pair up user by
user; each is also scored off-policy on the logged impressions (IPS, SNIPS, DR with bootstrap
intervals). The challenger is promoted only when the paired difference of its return over the
champion's has a bootstrap interval above the margin. The decision, the figures and the path
of the resulting champion are stored in `rec.model_runs` under the stage `evaluate`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
import psycopg
import torch

from rec import ope
from rec.policy import SlatePolicy, item_feature_matrix, user_feature_matrix

log = logging.getLogger(__name__)

STAGE = "evaluate"
"""The `rec.model_runs` stage of the decision; its artifact is the champion's policy file."""


@dataclass
class GateConfig:
    """How the challenger is judged."""

    n_users: int = 1024
    """Users simulated per policy (the population's first rows, or all of them if fewer)."""
    seed: int = 4242
    """Seed of the simulated users' randomness, the same for every policy."""
    margin: float = 0.0
    """The paired difference's interval must lie above this (in return units)."""
    alpha: float = 0.05
    """1 - the coverage of the bootstrap intervals."""
    n_boot: int = 1000
    """Bootstrap replicates."""
    exploration: float = 0.1
    """Share of slots the published lists sample from the policy's softmax (for OPE)."""


@torch.no_grad()
def simulate(env, policy: SlatePolicy, n_users: int, slate_size: int, seed: int,
             cold: torch.Tensor | None = None) -> dict:
    """Play one episode for the population's first `n_users` users with the policy's top K.

    A user's return adds up the day's expected reward given the simulated state and the
    slate (the environment's `expected_reward`), not the drawn one: the same mean with far
    less noise, so that paired differences between policies are sharp. Clicks and bookings
    are the drawn ones.

    Args:
        env: a `rec.sim.engine.SimEnv`; reseeded, so every policy meets the same users.
        policy: scores every service for every user.
        n_users: users to simulate.
        slate_size: K.
        seed: the environment's seed.
        cold: (U,) bool, users without history, for the cold-start segment.

    Returns:
        `returns` (n_users,) numpy per-user return, and the means `return`,
        `realised_return` (of the drawn rewards), `ctr` (clicks per active user-day),
        `bookings` (per user), `active_days` (per user), `coverage` (share of the catalogue
        shown) and `cold_start_return` (NaN without cold users).
    """
    env.seed(seed)
    users = torch.arange(min(n_users, env.population.n_users), device=env.device)
    catalogue = env.catalogue
    items = item_feature_matrix(catalogue.topic, catalogue.numeric, env.population.n_topics)
    state = env.reset(users)
    total = torch.zeros(len(users))
    realised = torch.zeros(len(users))
    clicks = bookings = active = 0.0
    shown = torch.zeros(catalogue.n_items, dtype=torch.bool)
    while not env.done:
        features = user_feature_matrix(state.interest, state.strength, state.signup)
        slates = torch.topk(policy.score(features, items), slate_size, dim=1).indices
        shown[slates[state.active].flatten()] = True
        state, reward, info = env.step(slates)
        total += info.get("expected_reward", reward)
        realised += reward
        clicks += info["clicks"].sum().item()
        bookings += info["bookings"].sum().item()
        active += info["active"].sum().item()
    cold_rows = cold[users] if cold is not None else torch.zeros(len(users), dtype=torch.bool)
    return {
        "returns": total.numpy(),
        "return": total.mean().item(),
        "realised_return": realised.mean().item(),
        "ctr": clicks / max(active, 1.0),
        "bookings": bookings / len(users),
        "active_days": active / len(users),
        "coverage": shown.float().mean().item(),
        "cold_start_return": total[cold_rows].mean().item() if cold_rows.any() else float("nan"),
    }


def paired_difference(a: np.ndarray, b: np.ndarray, n_boot: int = 1000, alpha: float = 0.05,
                      seed: int = 0) -> dict:
    """Mean of a - b over paired users, with a percentile bootstrap interval."""
    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    low, high = ope.bootstrap_interval(lambda idx: diff[idx].mean(axis=1), len(diff),
                                       n_boot=n_boot, alpha=alpha, seed=seed)
    return {"mean": float(diff.mean()), "ci": [low, high]}


def decide(difference: dict | None, margin: float = 0.0) -> str:
    """`promote` (no champion yet, or the interval lies above the margin) or `keep`."""
    if difference is None:
        return "promote"
    return "promote" if difference["ci"][0] > margin else "keep"


@torch.no_grad()
def off_policy(policy: SlatePolicy, slates, items, choice_model, exploration: float = 0.1,
               n_boot: int = 1000, seed: int = 0) -> dict:
    """IPS, SNIPS and DR estimates of the policy's click rate per impression, with intervals.

    The evaluation policy fills slot p with the policy's p-th best service with probability
    1 - exploration, else with a draw from the softmax of its scores (as published). The
    reward model for DR is the choice model's click probability of the service alone at that
    position. Impressions without a logged propensity are left out. The intervals are a
    cluster bootstrap over user states.

    Args:
        policy: the policy to evaluate.
        slates: `rec.features.LoggedSlates` of the window, with propensities.
        items: `rec.features.Items` the logged items index.
        choice_model: the fitted `rec.choice.ChoiceModel`.
        exploration: share of explored slots of the evaluation policy.
        n_boot: bootstrap replicates.
        seed: seed of the bootstrap.

    Returns:
        {estimator: {"estimate", "ci"}} and `rows`, or {"rows": 0} without usable rows.
    """
    return off_policy_many({"policy": policy}, slates, items, choice_model, exploration,
                           n_boot, seed)["policy"]


@torch.no_grad()
def off_policy_many(policies: dict[str, SlatePolicy], slates, items, choice_model,
                    exploration: float = 0.1, n_boot: int = 1000, seed: int = 0) -> dict:
    """`off_policy` of several policies on the same logs: {name: estimates}.

    The choice model's click probabilities, which do not depend on the policy, are computed
    once for all of them.
    """
    propensity = slates.propensity
    if propensity is None or slates.item.numel() == 0:
        return {name: {"rows": 0} for name in policies}
    keep = torch.isfinite(propensity) & (propensity > 0)
    if not keep.any():
        return {name: {"rows": 0} for name in policies}
    item, position, state = slates.item[keep], slates.position[keep], slates.state[keep]
    q_logged, terms = _evaluation_terms(list(policies.values()), slates.states, items,
                                        choice_model, item, position, state, exploration)
    feedback = ope.LoggedFeedback(
        action=np.zeros(len(item), dtype=int), position=np.zeros(len(item), dtype=int),
        reward=slates.clicked[keep].double().numpy(),
        pscore=propensity[keep].double().numpy())
    results = {}
    for name, (p_logged, direct) in zip(policies, terms, strict=True):
        # Two pseudo-actions per row, the logged service and all the others, carry exactly
        # the probabilities and the direct-method sum DR needs, without an (N, S, P) table.
        q_other = (direct - p_logged * q_logged) / (1.0 - p_logged).clamp(min=1e-12)
        action_dist = torch.stack([p_logged, 1.0 - p_logged], dim=1).unsqueeze(2)
        reward_hat = torch.stack([q_logged, q_other], dim=1).unsqueeze(2)
        # The impressions of one user state (a user's day) share their user and slate, so
        # the intervals resample user states, not impressions.
        estimates = ope.evaluate_policy(feedback, action_dist.double().numpy(),
                                        reward_hat.double().numpy(), n_boot=n_boot,
                                        seed=seed, clusters=state.numpy())
        results[name] = {"rows": len(item), **{k: e.as_dict() for k, e in estimates.items()}}
    return results


def _evaluation_terms(policies: list[SlatePolicy], states, items, choice_model,
                      item: torch.Tensor, position: torch.Tensor, state: torch.Tensor,
                      exploration: float, chunk: int = 2048):
    """Per logged row: the reward model's click probability of the logged service, and for
    each policy the evaluation policy's probability of that service at its position and the
    direct-method sum over every service.

    Everything a row needs depends on its user state and position only, so the policies'
    scores and the choice model's utilities are computed once per state, `chunk` states
    at a time, never once per logged impression: memory stays at chunk x services x
    positions, and the time grows with the states rather than the impressions. The click
    probabilities are shared by the policies.

    Returns:
        q_logged (N,), and [(p_logged (N,), direct (N,)) for each policy].
    """
    n_topics = choice_model.config["n_topics"]
    last = choice_model.config["n_positions"] - 1
    bias = choice_model.position_bias[: last + 1]
    item_features = item_feature_matrix(items.topic, items.numeric, n_topics)
    n_services = len(items.topic)
    depth = min(n_services, int(position.max()) + 1)
    slot = position.clamp(max=last)
    q_logged = torch.empty(len(item))
    terms = [(torch.empty(len(item)), torch.empty(len(item))) for _ in policies]
    order = state.argsort()
    bounds = torch.searchsorted(state[order], torch.arange(0, len(states.interest) + chunk,
                                                           chunk))
    for block, first in enumerate(range(0, len(states.interest), chunk)):
        rows = order[bounds[block]:bounds[block + 1]]
        if len(rows) == 0:
            continue
        stop = first + chunk
        interest, strength = states.interest[first:stop], states.strength[first:stop]
        signup = states.signup[first:stop]
        features = user_feature_matrix(interest, strength, signup)
        utility = choice_model.all_item_utilities(interest, strength, signup, items.topic,
                                                  items.numeric)
        click = torch.sigmoid(utility.unsqueeze(2) + bias)  # (states, services, positions)
        s, i, p, b = state[rows] - first, item[rows], position[rows], slot[rows]
        in_depth = p < depth
        q_logged[rows] = click[s, i, b]
        for policy, (p_logged, direct) in zip(policies, terms, strict=True):
            scores = policy.score(features, item_features)
            softmax = torch.softmax(scores, dim=1)
            best = scores.topk(depth, dim=1).indices
            # sum_j softmax_j * click_j at each position's bias: (states, positions).
            explored = torch.einsum("cs,csp->cp", softmax, click)
            greedy_item = best[s, p.clamp(max=depth - 1)]
            p_logged[rows] = ((1.0 - exploration) * ((greedy_item == i) & in_depth).float()
                              + exploration * softmax[s, i]).clamp(1e-12, 1.0)
            direct[rows] = ((1.0 - exploration) * click[s, greedy_item, b] * in_depth.float()
                            + exploration * explored[s, b])
    return q_logged, terms


def json_safe(value):
    """The value with NaN and infinities as None (jsonb has no NaN), numpy as Python."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def champion_policy_path(conn: psycopg.Connection, run_date: date,
                         before: bool = False) -> Path | None:
    """The champion's policy file as decided by the newest `evaluate` run up to `run_date`.

    With `before`, only decisions of earlier dates count (the warm start of tonight's run).
    """
    comparison = "<" if before else "<="
    rows = conn.execute(
        f"select artifact_path from rec.model_runs where stage = %s and run_date {comparison} %s"
        " and artifact_path is not null order by run_date desc, created_at desc",
        (STAGE, run_date)).fetchall()
    for (path,) in rows:
        if Path(path).exists():
            return Path(path)
    return None


def gate(env, challenger: SlatePolicy, champion: SlatePolicy | None,
         baselines: dict[str, SlatePolicy], slate_size: int, cold: torch.Tensor | None = None,
         logged=None, items=None, choice_model=None,
         config: GateConfig | None = None) -> dict:
    """Judge the challenger against the champion and the baselines; return the figures.

    Returns:
        `decision` (`promote` or `keep`), `difference` (paired challenger - champion return,
        with its interval; None without a champion), `versus` {baseline: paired challenger -
        baseline return with its interval}, `champion_versus` (the same for the champion;
        empty without one), `simulated` {policy: figures} and
        `off_policy` {policy: estimates} (empty without logged data).
    """
    config = config or GateConfig()
    policies = {"challenger": challenger, **({"champion": champion} if champion else {}),
                **baselines}
    simulated = {name: simulate(env, policy, config.n_users, slate_size, config.seed, cold)
                 for name, policy in policies.items()}
    difference = None
    if champion is not None:
        difference = paired_difference(simulated["challenger"]["returns"],
                                       simulated["champion"]["returns"], config.n_boot,
                                       config.alpha, config.seed)
    decision = decide(difference, config.margin)
    versus = {name: paired_difference(simulated["challenger"]["returns"],
                                      simulated[name]["returns"], config.n_boot, config.alpha,
                                      config.seed) for name in baselines}
    champion_versus = {name: paired_difference(simulated["champion"]["returns"],
                                               simulated[name]["returns"], config.n_boot,
                                               config.alpha, config.seed)
                       for name in baselines} if champion is not None else {}
    estimates = {}
    if logged is not None and items is not None and choice_model is not None:
        # Limitation: a popularity ranking is bound to the active catalogue it was built for,
        # so off-policy figures cover the learned policies and the myopic baseline only.
        estimates = off_policy_many(
            {name: policies[name] for name in ("challenger", "champion", "myopic")
             if name in policies},
            logged, items, choice_model, config.exploration, config.n_boot, config.seed)
    figures = {name: {k: v for k, v in result.items() if k != "returns"}
               for name, result in simulated.items()}
    log.info("gate: challenger %.3f, champion %s, difference %s -> %s; versus baselines %s",
             figures["challenger"]["return"],
             f"{figures['champion']['return']:.3f}" if champion else "none",
             difference, decision, versus)
    return {"decision": decision, "difference": difference, "versus": versus,
            "champion_versus": champion_versus, "simulated": figures, "off_policy": estimates,
            "margin": config.margin}
