"""How much click-through a ranking can gain over popularity in the world, at best.

Seeds a world (the same `WorldSpec` the closed-loop experiment uses) in a fresh database and,
from its hidden truth, computes the expected click-through of a visit (the chance that the
slate of ten gets a click, `rec.world.traffic.click_probability`) on day 0 for:

- oracle: each user's ten services of highest hidden utility (true interests, quality, price);
- best single list: the ten services of highest mean utility over all users, shown to
  everyone (an upper bound on any non-personalised ranking, popularity included);
- sign-up topics: the best-quality services of each user's sign-up topics, as a cold-start
  ranking that knows the user's picks and the experts' hidden quality;
- random: ten services drawn uniformly.

The oracle's ratio to the best single list bounds the CTR uplift over popularity that any
policy could reach in this world on day 0, before interests drift towards what is shown.

    .venv/bin/python bench/world_ceiling.py [--users 10000] [--experts 500] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import psycopg
import torch

from rec import db
from rec.world.generate import WorldSpec, seed_world
from rec.world.traffic import Behaviour, click_probability, load_state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--experts", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault("REC_HOME", tempfile.mkdtemp(prefix="rec-ceiling-"))
    with db.scratch_database("ceiling") as url, psycopg.connect(url) as conn:
        seed_world(conn, WorldSpec(users=args.users, experts=args.experts, seed=args.seed))
        state = load_state(conn)
        signup = conn.execute("select signup_topics from app.users order by user_id")
        picks = [row[0] for row in signup.fetchall()]

    behaviour = Behaviour()
    k = behaviour.slate_size
    users = torch.arange(len(state.user_ids))
    n_services = len(state.service_ids)
    utility = (behaviour.interest_weight * state.interests[:, state.service_topic]
               + behaviour.quality_weight * state.service_quality
               - behaviour.price_weight * torch.log(state.service_price / 60.0))
    picked = torch.zeros_like(state.interests)
    for row, topics in enumerate(picks):
        picked[row, topics] = 1.0
    signup_score = picked[:, state.service_topic] * 10.0 + state.service_quality
    generator = torch.Generator().manual_seed(args.seed)
    slates = {
        "oracle": utility.topk(k, dim=1).indices,
        "best_single_list": utility.mean(0).topk(k).indices.expand(len(users), k),
        "signup_topics": signup_score.topk(k, dim=1).indices,
        "random": torch.rand(len(users), n_services, generator=generator).topk(k, 1).indices,
    }
    ctr = {name: click_probability(state, behaviour, users, s).mean().item()
           for name, s in slates.items()}
    for name, value in ctr.items():
        print(f"{name:>17}: CTR {value:.3f}  ({value / ctr['best_single_list'] - 1:+.1%}"
              " vs best single list)")
    print(json.dumps({"users": args.users, "experts": args.experts, "seed": args.seed,
                      **{f"ctr_{name}": round(v, 4) for name, v in ctr.items()},
                      "oracle_uplift_vs_best_list":
                          round(ctr["oracle"] / ctr["best_single_list"] - 1, 4)}))


if __name__ == "__main__":
    main()
