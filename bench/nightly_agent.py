"""The nightly agent's share of a run at issue scale: distil, fine-tune, gate, side by side.

Run: .venv/bin/python bench/nightly_agent.py [--users 10000] [--experts 500] [--steps 60]
Builds a fitted environment of that size from drawn parameters (no database: the loading
and fitting steps are measured by the DAG itself), then times each step of
`rec.train.train_agent`'s learning part on one thread: distilling the lookahead into a
two-tower policy, REINFORCE fine-tuning, and the gate's simulations of five policies. Prints
one line per step with its seconds and its share of the 45 s budget, the gate's figures, and
one JSON line. Each step's process CPU seconds are printed beside its wall seconds: on a
shared machine the wall time is an upper bound, and the CPU time (one thread) is close to what
the step costs on a core of its own.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch

from rec.agents.baselines import MyopicPolicy, PopularityPolicy, RandomPolicy
from rec.agents.lookahead import DistillArgs, Lookahead, distill
from rec.agents.reinforce import ReinforceArgs, train_reinforce
from rec.choice import ChoiceModel
from rec.evaluate import GateConfig, gate
from rec.retention import BookingModel
from rec.sim.engine import ActivityModel, BookingResponse, Catalogue, SimEnv, UserState
from rec.train import DISTILL_STEPS

BUDGET_S = 45.0
N_TOPICS = 12
SLATE_SIZE = 10


def build_env(users: int, experts: int, seed: int) -> SimEnv:
    """A fitted-looking environment: sparse interests, 40% cold users, 2 services per expert."""
    g = torch.Generator().manual_seed(seed)
    interest = torch.distributions.Dirichlet(torch.full((N_TOPICS,), 0.35)).sample((users,))
    cold = torch.rand(users, generator=g) < 0.4
    interest[cold] = 0.0
    strength = torch.where(cold, 0.0, 1.0 + torch.rand(users, generator=g))
    signup = (torch.rand(users, N_TOPICS, generator=g) < 0.15).float()
    n_items = 2 * experts
    expert = torch.arange(n_items) // 2
    topic = torch.randint(0, N_TOPICS, (experts,), generator=g)[expert]
    numeric = torch.randn(n_items, 4, generator=g)
    choice = ChoiceModel(N_TOPICS, 4, SLATE_SIZE, n_experts=experts)
    booking = BookingModel([0], n_experts=experts)
    with torch.no_grad():
        choice.affinity.copy_(2.0 * torch.eye(N_TOPICS))
        choice.signup_coef.fill_(0.8)
        choice.numeric_coef.copy_(torch.tensor([-0.3, 0.4, 0.1, 0.2]))
        choice.later_position_bias.copy_(-0.1 * torch.arange(1, SLATE_SIZE))
        choice.intercept.fill_(-3.0)
        choice.expert_effect.copy_(0.3 * torch.randn(experts, generator=g))
        booking.intercept.fill_(-0.8)
        booking.interest_coef.fill_(1.0)
        booking.numeric_coef.fill_(-0.3)
        booking.expert_effect.copy_(0.4 * torch.randn(experts, generator=g))
    return SimEnv(
        UserState.from_features(interest, strength, signup),
        Catalogue(topic, numeric, expert),
        choice,
        BookingResponse(torch.zeros(n_items), booking_value=1.0, click_value=0.0,
                        booking_model=booking),
        horizon=8,
        p_active=torch.distributions.Beta(2.0, 5.0).sample((users,)),
        seed=seed,
        activity_model=ActivityModel(0.02 * torch.randn(n_items, generator=g)),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--experts", type=int, default=500)
    parser.add_argument("--steps", type=int, default=60, help="REINFORCE updates")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)

    started = time.perf_counter()
    env = build_env(args.users, args.experts, args.seed)
    figures = {"users": args.users, "services": env.catalogue.n_items,
               "load_average_1min": os.getloadavg()[0]}
    figures["build_s"] = time.perf_counter() - started

    started, cpu = time.perf_counter(), time.process_time()
    start, _ = distill(env, Lookahead(env, 0.1), None,
                       DistillArgs(seed=args.seed, steps=DISTILL_STEPS))
    figures["distill_s"] = time.perf_counter() - started
    figures["distill_cpu_s"] = time.process_time() - cpu

    started, cpu = time.perf_counter(), time.process_time()
    reinforce = ReinforceArgs(seed=args.seed, num_updates=args.steps, slate_size=SLATE_SIZE,
                              batch_users=512, learning_rate=1e-3, entropy_coef=0.0,
                              topk_correction=False)
    policy, metrics = train_reinforce(env, copy.deepcopy(start), reinforce)
    figures["reinforce_s"] = time.perf_counter() - started
    figures["reinforce_cpu_s"] = time.process_time() - cpu
    figures["reinforce_user_days_per_s"] = metrics["charts/SPS"]

    started, cpu = time.perf_counter(), time.process_time()
    myopic = MyopicPolicy(env.choice_model)
    popularity = PopularityPolicy(env.catalogue.n_items, torch.rand(env.catalogue.n_items))
    result = gate(env, policy, start, {"random": RandomPolicy(args.seed), "myopic": myopic,
                                       "popularity": popularity}, SLATE_SIZE,
                  config=GateConfig())
    figures["gate_s"] = time.perf_counter() - started
    figures["gate_cpu_s"] = time.process_time() - cpu
    for kind in ("s", "cpu_s"):
        figures[f"agent_total_{kind}"] = sum(figures[f"{step}_{kind}"]
                                             for step in ("distill", "reinforce", "gate"))
    figures["gate_decision"] = result["decision"]
    figures["versus_myopic"] = result["versus"]["myopic"]
    figures["returns"] = {name: r["return"] for name, r in result["simulated"].items()}

    print(f"{args.users} users, {env.catalogue.n_items} services, load average "
          f"{figures['load_average_1min']:.1f} on {os.cpu_count()} cores, one torch thread")
    print(f"  {'step':<12} {'wall s':>8} {'cpu s':>8}  cpu share of {BUDGET_S:.0f} s")
    for step in ("distill", "reinforce", "gate", "agent_total"):
        wall, cpu_s = figures[f"{step}_s"], figures[f"{step}_cpu_s"]
        print(f"  {step:<12} {wall:8.1f} {cpu_s:8.1f}  {cpu_s / BUDGET_S:6.1%}")
    print(f"  gate: challenger - myopic {figures['versus_myopic']['mean']:.4f} "
          f"{figures['versus_myopic']['ci']}, decision vs start: {figures['gate_decision']}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
