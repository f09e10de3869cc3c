"""Warm-started retraining against training from scratch after a day's drift, in the preset.

Day 1 trains the agent from scratch and saves its policy file, training state included, the
way `rec sim train --out` does (or `--day1 FILE` reuses one). Day 2's environment has
drifted as a night's new data would move the fitted simulator: other users, interests that
move a little faster, a little more budget refilled per unit of quality, and with `--drift
swap` (the default) also the best cluster's quality traded with that of the worst of the
good ones (3.0 and 0.0), so that day 1's favourite turns mediocre and the optimum moves;
`--drift mild` leaves the qualities alone, a drift that day 1's policy largely survives.

On day 2 the agent is trained once from scratch, and then
warm-started from day 1's FILE through the code path of `rec sim train --init` with budgets of
a growing share of the from-scratch steps, each run starting again from the file. Every policy
is evaluated greedily on the same day-2 episodes. It prints the steps of the shortest warm run
that reaches the from-scratch return (less two standard errors), the from-scratch steps, and
their ratio (the target is at most 0.2), and whether that warm run also reaches the
from-scratch return itself.

    .venv/bin/python bench/warm_start.py [--agent slateq|reinforce] [--steps N] [--seed 0]
        [--drift swap|mild] [--day1 FILE]
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

from rec.agents.recsim_rollout import greedy_return
from rec.agents.recsim_train import train_agent, train_and_save
from rec.policy import load_slate_policy
from rec.sim.recsim import RecSimConfig

MILD = replace(RecSimConfig(), interest_step=0.33, budget_refill=1.05 * 0.9 / 3.4)
DRIFTS = {"mild": MILD, "swap": replace(MILD, quality_swaps=((19, 14),))}
"""Day 2's drifted environments. On 1,000 episodes a 5 M-step REINFORCE day-1 policy
(seed 0) returned 294.5 under `mild` and 251.1 under `swap`."""
EVAL_EPISODES = 3000
EVAL_SEED = 777
WARM_SHARES = (0.05, 0.1, 0.2, 0.35, 0.5)
"""Budgets of the warm runs, as shares of the from-scratch steps, tried in this order."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agent", choices=["slateq", "reinforce"], default="slateq")
    parser.add_argument("--steps", type=int, help="from-scratch user-steps (agent's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--drift", choices=sorted(DRIFTS), default="swap")
    parser.add_argument("--day1", type=Path, help="a saved day-1 policy file of this agent"
                        " to reuse instead of training one")
    args = parser.parse_args()
    day2 = DRIFTS[args.drift]
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)

    if args.day1:
        day1_path = args.day1
        print(f"day 1: reusing {day1_path}", flush=True)
    else:
        started = time.perf_counter()
        day1_path = Path(tempfile.mkdtemp()) / "day1.pt"
        day1 = train_and_save(args.agent, day1_path, args.steps, args.seed, progress=False)
        print(f"day 1 from scratch: {day1['user_steps']:,d} steps in"
              f" {time.perf_counter() - started:.0f} s, saved to {day1_path}"
              f" ({day1_path.stat().st_size / 1024:.0f} KiB, training state included)",
              flush=True)

    started = time.perf_counter()
    scratch, metrics = train_agent(args.agent, args.steps, args.seed + 1, progress=False,
                                   config=day2)
    scratch_seconds = time.perf_counter() - started
    scratch_steps = metrics["user_steps"]
    final = greedy_return(scratch, EVAL_EPISODES, EVAL_SEED, day2)
    target = final["return"] - 2.0 * final["sem"]
    print(f"day 2 from scratch: {scratch_steps:,d} steps in {scratch_seconds:.0f} s,"
          f" greedy return {final['return']:.1f} +- {final['sem']:.1f}", flush=True)

    day1_return = greedy_return(load_slate_policy(day1_path), EVAL_EPISODES, EVAL_SEED, day2)
    print(f"day 1's policy on day 2, untrained: {day1_return['return']:.1f}", flush=True)

    # Independent warm runs of growing length, each from day 1's file; the shortest one that
    # reaches the from-scratch return (less two standard errors) counts.
    warm_steps = warm_return = warm_seconds = None
    for share in WARM_SHARES:
        started = time.perf_counter()
        policy, warm = train_agent(args.agent, int(share * scratch_steps), args.seed + 2,
                                   progress=False, warm_start=day1_path, config=day2)
        value = greedy_return(policy, EVAL_EPISODES, EVAL_SEED, day2)["return"]
        print(f"day 2 warm start: {warm['user_steps']:,d} steps in"
              f" {time.perf_counter() - started:.0f} s, greedy return {value:.1f}", flush=True)
        if value >= target:
            warm_steps, warm_return = warm["user_steps"], value
            warm_seconds = time.perf_counter() - started
            break
    result = {
        "agent": args.agent,
        "drift": args.drift,
        "from_scratch_steps": scratch_steps,
        "from_scratch_seconds": scratch_seconds,
        "from_scratch_return": final["return"],
        "target_return": target,
        "day1_policy_return": day1_return["return"],
        "warm_start_steps": warm_steps,
        "warm_start_seconds": warm_seconds,
        "warm_start_return": warm_return,
        "ratio": warm_steps / scratch_steps if warm_steps else None,
        "warm_reaches_from_scratch_return": (warm_return is not None
                                             and warm_return >= final["return"]),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
