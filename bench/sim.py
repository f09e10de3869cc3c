"""Speed of the `recsim` preset, side by side: random, myopic and a neural policy's slates.

Run: .venv/bin/python bench/sim.py [--episodes 200000] [--workers 2] [--threads 1]
Prints one line per configuration, then one JSON line with every figure. Speeds are user-steps
per second (one step of one episode), compared with Google RecSim's 5,300 on one core.
"""

from __future__ import annotations

import argparse
import json
import platform

import torch

from rec.policy import TwoTowerPolicy
from rec.sim.recsim import (
    N_TOPICS,
    RECSIM_STEPS_PER_S,
    MyopicSlatePolicy,
    RandomSlatePolicy,
    RecSimEnv,
    ScoringSlatePolicy,
    evaluate,
)


class EagerQualityRandomPolicy(RandomSlatePolicy):
    """Random slates, but every candidate's hidden quality is drawn, as RecSim does."""

    def select(self, env: RecSimEnv) -> torch.Tensor:
        env.candidate_quality()
        return super().select(env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--episodes", type=int, default=200_000)
    parser.add_argument("--learned-episodes", type=int, default=50_000,
                        help="episodes for the neural policy (it is slower)")
    parser.add_argument("--batch-size", type=int, default=25_000)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; with shared cores one is fastest")
    parser.add_argument("--workers", type=int, default=2,
                        help="processes playing batches side by side, one thread each")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    # Untrained weights: the speed of a forward pass does not depend on their values.
    network = TwoTowerPolicy(N_TOPICS, n_numeric=1, embed_dim=16, hidden_dim=64)
    runs = {
        "random": (RandomSlatePolicy(args.seed + 1), args.episodes),
        "random_all_qualities": (EagerQualityRandomPolicy(args.seed + 1), args.episodes),
        "myopic": (MyopicSlatePolicy(), args.episodes),
        "two_tower": (ScoringSlatePolicy(network), args.learned_episodes),
    }
    figures: dict[str, dict[str, float]] = {}
    print(f"recsim preset, {args.workers} worker(s) x {args.threads} torch thread(s),"
          f" batches of {args.batch_size} episodes")
    print(f"{'policy':<22}{'episodes':>10}{'return':>10}{'user-steps/s':>15}{'x RecSim':>10}")
    for name, (policy, episodes) in runs.items():
        result = evaluate(policy, episodes, seed=args.seed, batch_size=args.batch_size,
                          workers=args.workers)
        ratio = result["steps_per_s"] / RECSIM_STEPS_PER_S
        figures[name] = {
            "episodes": episodes,
            "return": round(result["return"], 3),
            "steps_per_s": round(result["steps_per_s"]),
            "ratio_vs_recsim": round(ratio, 1),
        }
        print(f"{name:<22}{episodes:>10}{result['return']:>10.2f}"
              f"{result['steps_per_s']:>15,.0f}{ratio:>10.0f}")
    print(json.dumps({
        "bench": "sim", "workers": args.workers, "threads": args.threads,
        "batch_size": args.batch_size,
        "torch": torch.__version__, "python": platform.python_version(),
        "recsim_steps_per_s": RECSIM_STEPS_PER_S, "runs": figures,
    }))


if __name__ == "__main__":
    main()
