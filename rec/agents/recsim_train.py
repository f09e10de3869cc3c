"""Train an agent in the `recsim` preset and save it with its learning curve.

`rec sim train` calls `train_and_save`; the saved file is a `rec.policy.SlatePolicy` that
`rec sim evaluate --policy PATH` and `rec.policy.load_slate_policy` read back. The file also
carries the training state (the critic and the optimisers' moments), so that
`rec sim train --init PATH` continues a saved run where it stopped.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from rec.agents.recsim_rollout import save_learning_curve
from rec.sim.recsim import RECSIM_RETURNS, RecSimConfig

logger = logging.getLogger(__name__)

AGENTS = {"reinforce": "candidate_softmax", "slateq": "slateq"}
"""The agents `train_and_save` knows, and the policy kind each one trains."""

WARM_START_SHARE = 0.2
"""A warm start's default user-steps, as a share of the agent's default from scratch."""

# Measured with `bench/warm_start.py` (day 1 and day 2 from scratch 2 M steps, warm runs of
# about 0.44 M from day 1's file): REINFORCE with a smaller step size and entropy bonus
# (2.5e-4, 0.002) stayed at 289.0-289.6 against the from-scratch 293.4; with the
# from-scratch knobs and the continued policy's logits halved (`warm_temperature` 2), so
# that it samples widely again, 289.4-292.3.
# After a drift that swaps the best cluster's quality (day 2 from scratch 2 M steps, 293.7
# over 3 seeds), 0.4 M warm steps, 3 seeds each: those knobs 270.7 at 0.2 M steps; with
# batches of 256 episodes 279.3, and a step size of 1e-3 282.5; with minibatches of 1,024
# steps as well (four times the updates per step played) 292.5, or 291.6 at 5e-4; those
# last knobs at 0.3 M steps 292.3.
# SlateQ, after a drift that swaps the best cluster's quality (`bench/warm_start.py`, day 1
# 3 M steps, day 2 from scratch 311.6 over 3 seeds), 0.6 M warm steps, 3 seeds each: with
# batches of 1,024 episodes (two or three updates rounds in all) 309.7; batches of 256,
# 310.6; with shrink-and-perturb (0.8, 0.01) as well, 311.1; shrinking by 0.5, 310.4.
WARM_START_ARGS: dict[str, dict[str, Any]] = {
    "reinforce": {"warm_temperature": 2.0, "validate_from": 0.0, "episodes_per_batch": 256,
                  "minibatch": 1024, "learning_rate": 1e-3},
    "slateq": {"epsilon_start": 0.05, "epsilon_end": 0.02, "episodes_per_batch": 256,
               "warm_shrink": 0.8, "warm_noise": 0.01},
}
"""How a warm start's knobs differ from a run from scratch. Both play smaller batches, so
that a short run still makes many updates; REINFORCE also takes smaller minibatches and a
larger step size, and samples from a softened copy of the file's policy; SlateQ explores
less and shrinks and perturbs the continued network's weights."""


def _agent_args(agent: str, seed: int, steps: int | None, warm: bool,
                eval_episodes: int | None = None) -> Any:
    if agent == "slateq":
        from rec.agents.slateq import SlateQArgs as Args
    elif agent == "reinforce":
        from rec.agents.topk_reinforce import TopKReinforceArgs as Args
    else:
        raise ValueError(f"unknown agent {agent!r}; known: {sorted(AGENTS)}")
    args = Args(seed=seed)
    if warm:
        args = replace(args, **WARM_START_ARGS[agent])
        args.total_steps = int(args.total_steps * WARM_START_SHARE)
    if steps:
        args.total_steps = steps
    if eval_episodes:
        args.eval_episodes = eval_episodes
    return args


def train_agent(
    agent: str, steps: int | None = None, seed: int = 0, progress: bool = True,
    warm_start: str | Path | None = None, config: RecSimConfig | None = None,
    eval_episodes: int | None = None,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train `agent` (`reinforce` or `slateq`) for `steps` user-steps, from scratch or on.

    Args:
        agent: `reinforce` or `slateq`.
        steps: user-steps to train; None for the agent's default (a fifth of it when warm).
        seed: seed of the run.
        progress: show a progress bar.
        warm_start: a policy file saved by `train_and_save` to continue from: its policy,
            critic and optimiser moments. A file without training state (older ones)
            continues the policy with a new critic.
        config: the environment's constants; RecSim's defaults when omitted.
        eval_episodes: episodes of the final greedy evaluation; None for the agent's default.

    Returns:
        The trained policy and the agent's metrics (see `train_slateq`, `train_topk_reinforce`).

    Raises:
        ValueError: an unknown agent, or a warm-start file of another agent's policy.
    """
    from rec.policy import load_slate_policy, load_training_state

    args = _agent_args(agent, seed, steps, warm_start is not None, eval_episodes)
    policy = training = None
    if warm_start is not None:
        policy = load_slate_policy(warm_start)
        if policy.kind != AGENTS[agent]:
            raise ValueError(f"{warm_start} holds a {policy.kind!r} policy; the {agent} agent"
                             f" continues only {AGENTS[agent]!r} policies")
        training = load_training_state(warm_start)
        if training is None:
            logger.warning("%s has no training state: its critic starts afresh", warm_start)
        logger.info("%s: warm start from %s (%s user-steps before)", agent, warm_start,
                    (training or {}).get("user_steps", "?"))
    if agent == "slateq":
        from rec.agents.slateq import train_slateq

        return train_slateq(args, policy, config, progress=progress, training=training)
    from rec.agents.topk_reinforce import train_topk_reinforce

    return train_topk_reinforce(args, policy, config, progress=progress, training=training)


def train_and_save(
    agent: str, out: str | Path, steps: int | None = None, seed: int = 0,
    progress: bool = True, warm_start: str | Path | None = None,
    config: RecSimConfig | None = None, eval_episodes: int | None = None,
) -> dict[str, Any]:
    """Train, save the policy at `out` and its learning curve beside it (`<out>.png`).

    Args: as `train_agent`, and `out`, the policy file to write (with its training state).

    Returns:
        A summary: agent, paths, user-steps, seconds, steps per second, greedy return.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    policy, metrics = train_agent(agent, steps, seed, progress, warm_start, config,
                                  eval_episodes)
    summary = {
        "agent": agent,
        "policy": str(out),
        "curve": str(out.with_suffix(".png")),
        "seed": seed,
        "user_steps": metrics["user_steps"],
        "train_seconds": metrics["train_seconds"],
        "steps_per_s": metrics["charts/SPS"],
        "eval_return": metrics["eval/return"],
        "eval_sem": metrics["eval/sem"],
        "warm_start": str(warm_start) if warm_start else None,
    }
    policy.save(out, metadata={k: v for k, v in summary.items() if k != "policy"},
                training=metrics["training"])
    greedy = metrics.get("curve/greedy")
    save_learning_curve(
        out.with_suffix(".png"), metrics["curve/steps"], metrics["curve/return"],
        f"{agent} in the recsim preset (seed {seed})",
        {name: value for name, value in RECSIM_RETURNS.items()},
        greedy=greedy,
    )
    return summary
