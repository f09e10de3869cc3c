"""Train an agent in the `recsim` preset and save it with its learning curve.

`rec sim train` calls `train_and_save`; the saved file is a `rec.policy.SlatePolicy` that
`rec sim evaluate --policy PATH` and `rec.policy.load_slate_policy` read back.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from rec.agents.recsim_rollout import save_learning_curve
from rec.sim.recsim import RECSIM_RETURNS

logger = logging.getLogger(__name__)

AGENTS = ("reinforce", "slateq")
"""The agents `train_and_save` knows."""


def train_agent(
    agent: str, steps: int | None = None, seed: int = 0, progress: bool = True,
    warm_start: str | Path | None = None,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train `agent` (`reinforce` or `slateq`) for `steps` user-steps (its default if None)."""
    from rec.policy import load_slate_policy

    policy = load_slate_policy(warm_start) if warm_start else None
    if agent == "slateq":
        from rec.agents.slateq import SlateQArgs, train_slateq

        args = SlateQArgs(seed=seed)
        if steps:
            args.total_steps = steps
        return train_slateq(args, policy, progress=progress)
    if agent == "reinforce":
        from rec.agents.topk_reinforce import TopKReinforceArgs, train_topk_reinforce

        args = TopKReinforceArgs(seed=seed)
        if steps:
            args.total_steps = steps
        return train_topk_reinforce(args, policy, progress=progress)
    raise ValueError(f"unknown agent {agent!r}; known: {AGENTS}")


def train_and_save(
    agent: str, out: str | Path, steps: int | None = None, seed: int = 0,
    progress: bool = True, warm_start: str | Path | None = None,
) -> dict[str, Any]:
    """Train, save the policy at `out` and its learning curve beside it (`<out>.png`).

    Returns:
        A summary: agent, paths, user-steps, seconds, steps per second, greedy return.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    policy, metrics = train_agent(agent, steps, seed, progress, warm_start)
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
    policy.save(out, metadata={k: v for k, v in summary.items() if k != "policy"})
    save_learning_curve(
        out.with_suffix(".png"), metrics["curve/steps"], metrics["curve/return"],
        f"{agent} in the recsim preset (seed {seed})",
        {name: value for name, value in RECSIM_RETURNS.items()},
    )
    return summary
