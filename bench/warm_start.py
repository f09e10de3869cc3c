"""Warm-started retraining against training from scratch after a day's drift, in the preset.

Day 1 trains SlateQ from scratch. Day 2's environment has drifted (other users, interests
that move a little faster, a little more budget refilled per unit of quality) as a night's
new data would move the fitted simulator. On day 2 the agent is trained once from scratch and
once warm-started from day 1's policy, with runs of doubling length (a twentieth of
the from-scratch steps first), each starting from day 1's policy and
training critic and evaluated greedily on the same day-2 episodes. It prints
the steps of the shortest warm run that reaches the from-scratch return (less two standard
errors), the from-scratch steps, and their ratio.

    .venv/bin/python bench/warm_start.py [--steps 3000000] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from rec.agents.recsim_rollout import BudgetCritic, greedy_return
from rec.agents.slateq import SlateQArgs, train_slateq
from rec.policy import load_slate_policy
from rec.sim.recsim import RecSimConfig

DAY2 = replace(RecSimConfig(), interest_step=0.33, budget_refill=1.05 * 0.9 / 3.4)
"""Day 2's drifted environment."""
EVAL_EPISODES = 3000
EVAL_SEED = 777


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3_000_000, help="from-scratch user-steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)

    started = time.perf_counter()
    day1, day1_metrics = train_slateq(SlateQArgs(seed=args.seed, total_steps=args.steps),
                                      progress=False)
    print(f"day 1 trained in {time.perf_counter() - started:.0f} s", flush=True)
    day1_path = Path(tempfile.mkdtemp()) / "day1.pt"
    day1.save(day1_path)
    critic_path = day1_path.with_suffix(".critic.pt")
    torch.save(day1_metrics["critic"].state_dict(), critic_path)

    started = time.perf_counter()
    scratch, metrics = train_slateq(SlateQArgs(seed=args.seed + 1, total_steps=args.steps),
                                    config=DAY2, progress=False)
    scratch_seconds = time.perf_counter() - started
    final = greedy_return(scratch, EVAL_EPISODES, EVAL_SEED, DAY2)
    target = final["return"] - 2.0 * final["sem"]
    print(f"day 2 from scratch: {metrics['user_steps']:,d} steps in {scratch_seconds:.0f} s,"
          f" greedy return {final['return']:.1f} +- {final['sem']:.1f}", flush=True)

    # Independent warm-started runs of growing length, each from day 1's policy; the
    # shortest one that reaches the from-scratch return (less two standard errors) counts.
    warm_args = SlateQArgs(seed=args.seed + 2, epsilon_start=0.05, epsilon_end=0.02)
    warm_steps = warm_return = warm_seconds = None
    budget = args.steps // 20
    while budget <= args.steps // 2:
        started = time.perf_counter()
        policy = load_slate_policy(day1_path)
        critic = BudgetCritic(policy.config["n_topics"], warm_args.hidden_dim)
        critic.load_state_dict(torch.load(critic_path))
        policy, warm = train_slateq(replace(warm_args, total_steps=budget), policy, DAY2,
                                    progress=False, critic=critic)
        value = greedy_return(policy, EVAL_EPISODES, EVAL_SEED, DAY2)["return"]
        print(f"day 2 warm start: {warm['user_steps']:,d} steps in"
              f" {time.perf_counter() - started:.0f} s, greedy return {value:.1f}", flush=True)
        if value >= target:
            warm_steps, warm_return = warm["user_steps"], value
            warm_seconds = time.perf_counter() - started
            break
        budget *= 2
    result = {
        "from_scratch_steps": metrics["user_steps"],
        "from_scratch_seconds": scratch_seconds,
        "from_scratch_return": final["return"],
        "target_return": target,
        "warm_start_steps": warm_steps,
        "warm_start_seconds": warm_seconds,
        "warm_start_return": warm_return,
        "ratio": warm_steps / metrics["user_steps"] if warm_steps else None,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
