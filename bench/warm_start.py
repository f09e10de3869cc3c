"""Warm-started retraining against training from scratch after a day's drift, in the preset.

Day 1 trains the agent from scratch and saves its policy file, training state included, the
way `rec sim train --out` does (or `--day1 FILE` reuses one). Day 2's environment has
drifted as a night's new data would move the fitted simulator: other users, interests that
move a little faster, a little more budget refilled per unit of quality, and with `--drift
swap` (the default) also the best cluster's quality traded with that of the worst of the
good ones (3.0 and 0.0), so that day 1's favourite turns mediocre and the optimum moves;
`--drift mild` leaves the qualities alone, a drift that day 1's policy largely survives.

On day 2 the agent is trained from scratch with `--seeds` seeds, and then warm-started from
day 1's FILE through the code path of `rec sim train --init`, with budgets of a growing share
of the from-scratch steps and the same number of seeds per budget, each run starting again
from the file. Every policy is evaluated greedily on the same day-2 episodes. One training
seed is not enough to compare: between seeds the from-scratch return spreads by more than
its evaluation's standard error, so a single lucky (or unlucky) seed decides the answer.
A budget counts as reaching the from-scratch return when its mean over seeds is at least the
from-scratch mean less two standard errors of the difference of the means (from the spread
between seeds). It prints each run, the shortest budget that reaches it, the from-scratch
steps, their ratio (the target is at most 0.2), and whether that budget's mean also reaches
the from-scratch mean itself.

    .venv/bin/python bench/warm_start.py [--agent slateq|reinforce] [--steps N] [--seed 0]
        [--seeds 3] [--drift swap|mild] [--day1 FILE]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
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
WARM_SHARES = (0.05, 0.1, 0.15, 0.2, 0.35, 0.5)
"""Budgets of the warm runs, as shares of the from-scratch steps, tried in this order."""


def spread(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error over independent runs (0 for a single run)."""
    mean = statistics.fmean(values)
    error = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0
    return mean, error


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agent", choices=["slateq", "reinforce"], default="slateq")
    parser.add_argument("--steps", type=int, help="from-scratch user-steps (agent's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=3,
                        help="training seeds per day-2 setting (from scratch, each budget)")
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
    day1_return = greedy_return(load_slate_policy(day1_path), EVAL_EPISODES, EVAL_SEED, day2)
    print(f"day 1's policy on day 2, untrained: {day1_return['return']:.1f}", flush=True)

    scratch_returns, scratch_steps, scratch_seconds = [], [], []
    for seed in range(args.seed + 1, args.seed + 1 + args.seeds):
        started = time.perf_counter()
        scratch, metrics = train_agent(args.agent, args.steps, seed, progress=False,
                                       config=day2)
        scratch_seconds.append(time.perf_counter() - started)
        scratch_steps.append(metrics["user_steps"])
        scratch_returns.append(greedy_return(scratch, EVAL_EPISODES, EVAL_SEED, day2)["return"])
        print(f"day 2 from scratch, seed {seed}: {scratch_steps[-1]:,d} steps in"
              f" {scratch_seconds[-1]:.0f} s, greedy return {scratch_returns[-1]:.1f}",
              flush=True)
    scratch_mean, scratch_error = spread(scratch_returns)
    steps = round(statistics.fmean(scratch_steps))
    print(f"day 2 from scratch: {scratch_mean:.1f} +- {scratch_error:.1f} over"
          f" {args.seeds} seed(s), {steps:,d} steps", flush=True)

    # Independent warm runs of growing length, each from day 1's file; the shortest budget
    # whose mean over seeds reaches the from-scratch mean (within two standard errors of
    # the difference) counts.
    found = None
    for share in WARM_SHARES:
        returns, used, seconds = [], [], []
        for seed in range(args.seed + 101, args.seed + 101 + args.seeds):
            started = time.perf_counter()
            policy, warm = train_agent(args.agent, int(share * steps), seed, progress=False,
                                       warm_start=day1_path, config=day2)
            seconds.append(time.perf_counter() - started)
            used.append(warm["user_steps"])
            returns.append(greedy_return(policy, EVAL_EPISODES, EVAL_SEED, day2)["return"])
            print(f"day 2 warm start, {share:.0%} budget, seed {seed}: {used[-1]:,d} steps in"
                  f" {seconds[-1]:.0f} s, greedy return {returns[-1]:.1f}", flush=True)
        mean, error = spread(returns)
        allowance = 2.0 * (scratch_error**2 + error**2) ** 0.5
        print(f"day 2 warm start, {share:.0%} budget: {mean:.1f} +- {error:.1f}"
              f" (needs {scratch_mean - allowance:.1f})", flush=True)
        if mean >= scratch_mean - allowance:
            found = {"steps": round(statistics.fmean(used)), "return": mean, "error": error,
                     "seconds": statistics.fmean(seconds), "allowance": allowance}
            break
    result = {
        "agent": args.agent,
        "drift": args.drift,
        "seeds": args.seeds,
        "from_scratch_steps": steps,
        "from_scratch_seconds": statistics.fmean(scratch_seconds),
        "from_scratch_returns": scratch_returns,
        "from_scratch_return": scratch_mean,
        "from_scratch_error": scratch_error,
        "day1_policy_return": day1_return["return"],
        "warm_start_steps": found and found["steps"],
        "warm_start_seconds": found and found["seconds"],
        "warm_start_return": found and found["return"],
        "target_return": found and scratch_mean - found["allowance"],
        "ratio": found["steps"] / steps if found else None,
        "warm_reaches_from_scratch_mean": bool(found and found["return"] >= scratch_mean),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
