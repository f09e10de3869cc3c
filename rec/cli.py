"""The `rec` command: database, world, nightly runs, the demo and recommendations."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from datetime import date

log = logging.getLogger("rec")


def _date(text: str) -> date:
    return date.fromisoformat(text)


def cmd_db(args: argparse.Namespace) -> int:
    from rec import db

    if args.action == "url":
        print(db.database_url())
    else:
        applied = db.migrate()
        print(f"applied {len(applied)} migration(s): {', '.join(applied) or 'none pending'}")
    return 0


def cmd_world(args: argparse.Namespace) -> int:
    from rec import db
    from rec.world.generate import WorldSpec, seed_world, world_spec
    from rec.world.traffic import simulate_day

    db.migrate()
    with db.transaction() as conn:
        if args.action == "seed":
            seed_world(conn, WorldSpec(users=args.users, experts=args.experts, seed=args.seed))
        else:
            if world_spec(conn) is None:
                raise SystemExit("no world is seeded here: run `rec world seed` first")
            print(json.dumps(simulate_day(conn, args.date)))
    return 0


def cmd_nightly(args: argparse.Namespace) -> int:
    from rec.orchestrate import run_dag

    conf = {k: v for k, v in (("top_n", args.top_n), ("exploration", args.exploration),
                              ("agent_steps", args.agent_steps)) if v is not None}
    run_dag("rec_nightly", args.date, conf)
    print(f"rec_nightly for {args.date} succeeded")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from rec.demo import run_demo
    from rec.experiment import ARMS

    arms = [a.strip() for a in args.arms.split(",") if a.strip()] if args.arms else None
    if arms is not None and (not arms or set(arms) - set(ARMS)):
        raise SystemExit(f"--arms {args.arms!r}: choose among {', '.join(ARMS)}")
    if args.days < 1:
        raise SystemExit("--days must be at least 1")
    run_demo(days=args.days, users=args.users, experts=args.experts, seed=args.seed,
             as_json=args.json, arms=arms, fresh=args.fresh, parallel=args.parallel)
    return 0


def cmd_recommend(args: argparse.Namespace) -> int:
    from rec import db

    with db.connect() as conn:
        run_date = args.date or conn.execute(
            "select max(run_date) from rec.recommendations").fetchone()[0]
        if run_date is None:
            raise SystemExit("nothing is published yet: run `rec demo` or `rec nightly`")
        rows = conn.execute(
            "select r.rank, s.title, e.name, t.name, r.score, r.propensity, r.model_version"
            " from rec.recommendations r join app.services s using (service_id)"
            " join app.experts e on e.expert_id = r.expert_id"
            " join app.topics t on t.topic_id = s.topic_id"
            " where r.run_date = %s and r.user_id = %s order by r.rank",
            (run_date, args.user)).fetchall()
    if not rows:
        raise SystemExit(f"no list for user {args.user} on {run_date}")
    print(f"user {args.user}, list for {run_date} (model {rows[0][6]})")
    print(f"{'rank':>4}  {'score':>7}  {'prop':>5}  {'topic':<20} {'expert':<16} service")
    for rank, title, expert, topic, score, propensity, _ in rows:
        print(f"{rank:>4}  {score:>7.3f}  {propensity:>5.2f}  {topic:<20} {expert:<16} {title}")
    return 0


def cmd_sim(args: argparse.Namespace) -> int:
    import torch

    if args.action == "train":
        from rec.agents.recsim_train import train_and_save

        torch.set_num_threads(args.threads or torch.get_num_threads())
        print(json.dumps(train_and_save(args.agent, args.out, args.steps, args.seed,
                                        warm_start=args.init,
                                        eval_episodes=args.eval_episodes)))
        return 0

    from rec.sim.recsim import RECSIM_RETURNS, RECSIM_STEPS_PER_S, evaluate, make_policy

    if args.threads:
        torch.set_num_threads(args.threads)
    policy = make_policy(args.policy, seed=args.seed + 1, device=args.device)
    result = evaluate(policy, args.episodes, seed=args.seed, batch_size=args.batch_size,
                      device=args.device, workers=args.workers)
    result = {"preset": args.preset, "policy": args.policy, "seed": args.seed, **result,
              "recsim_return": RECSIM_RETURNS.get(args.policy),
              "speedup_vs_recsim": result["steps_per_s"] / RECSIM_STEPS_PER_S}
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>18}: {value}")
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from rec import db
    from rec.ingest.open_bandit import ingest_open_bandit

    db.migrate()
    summary = ingest_open_bandit(args.path, args.campaign)
    load = summary["load"]
    print(f"{summary['source']}: read {load['rows_read']} rows, accepted {load['rows_accepted']},"
          f" quarantined {load['rows_quarantined']} (ingest.open_bandit_quarantine);"
          f" {load['users']} users, {load['services']} services, {load['impressions']}"
          f" impressions, {load['clicks']} clicks; {len(summary.get('extract', {}))} days"
          " extracted, marts built and validated")
    if args.json:
        print(json.dumps(summary, default=str))
    return 0


def cmd_ope(args: argparse.Namespace) -> int:
    from rec.open_bandit import evaluate_bts

    result = evaluate_bts(args.random, args.bts, args.campaign, prior_file=args.prior,
                          n_sim=args.n_sim, n_boot=args.n_boot, seed=args.seed)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"campaign {result['campaign']}: BTS CTR observed {result['observed_ctr']:.5f}")
    for name, e in result["estimators"].items():
        print(f"{name:>6}: {e['estimate']:.5f}  95% CI [{e['ci'][0]:.5f}, {e['ci'][1]:.5f}]"
              f"  relative error {e['relative_error']:.2f}")
    model = result["choice_model"]
    print(f"choice model held-out log-loss {model['heldout_logloss']:.5f},"
          f" position-only {model['baseline_logloss']:.5f}")
    return 0


def cmd_airflow(args: argparse.Namespace) -> int:
    from rec.orchestrate import airflow_command, ensure_metadata_db

    ensure_metadata_db()
    return airflow_command(args.airflow_args, check=False).returncode


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rec", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("db", help="database URL and migrations")
    p.add_argument("action", choices=["url", "migrate"])
    p.set_defaults(func=cmd_db)

    p = sub.add_parser("world", help="the simulated world: seed it, play a day")
    wsub = p.add_subparsers(dest="action", required=True)
    seed = wsub.add_parser("seed")
    seed.add_argument("--users", type=int, default=1000)
    seed.add_argument("--experts", type=int, default=60)
    seed.add_argument("--seed", type=int, default=0)
    day = wsub.add_parser("day")
    day.add_argument("--date", type=_date, required=True)
    p.set_defaults(func=cmd_world)

    p = sub.add_parser("nightly", help="run rec_nightly through Airflow for one logical date")
    p.add_argument("--date", type=_date, required=True,
                   help="logical date D: processes day D-1, publishes the lists for D")
    p.add_argument("--top-n", type=int)
    p.add_argument("--exploration", type=float)
    p.add_argument("--agent-steps", type=int)
    p.set_defaults(func=cmd_nightly)

    p = sub.add_parser("demo", help="play the world and run the nightly DAG, day after day")
    p.add_argument("--days", type=int, default=3)
    p.add_argument("--users", type=int, default=1000)
    p.add_argument("--experts", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arms", help="run the experiment with these arms, e.g."
                   " rl,popularity,myopic: one copy of the world and one database per arm")
    p.add_argument("--fresh", action="store_true",
                   help="with --arms: start the experiment over instead of continuing it")
    p.add_argument("--parallel", action="store_true",
                   help="with --arms: play the arms side by side, one process each")
    p.add_argument("--json", action="store_true", help="also print the figures as JSON")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("recommend", help="print one user's published list")
    p.add_argument("--user", type=int, required=True)
    p.add_argument("--date", type=_date)
    p.set_defaults(func=cmd_recommend)

    p = sub.add_parser("sim", help="play episodes of a simulator preset with a policy")
    ssub = p.add_subparsers(dest="action", required=True)
    evaluate = ssub.add_parser("evaluate", help="mean return, its SEM, CTR and user-steps/s")
    evaluate.add_argument("--preset", choices=["recsim"], default="recsim")
    evaluate.add_argument("--policy", default="random",
                          help="random, myopic, oracle, or the path of a saved policy")
    evaluate.add_argument("--episodes", type=int, default=300)
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--batch-size", type=int, default=25_000,
                          help="episodes simulated together")
    evaluate.add_argument("--device", default="cpu")
    evaluate.add_argument("--threads", type=int, default=1,
                          help="torch threads (0: torch's default); one is fastest when the"
                          " cores are shared, as a busy core stalls every multi-threaded op")
    evaluate.add_argument("--workers", type=int, default=2,
                          help="processes playing batches side by side (same figures)")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    train = ssub.add_parser("train", help="train an agent in the preset and save its policy")
    train.add_argument("--preset", choices=["recsim"], default="recsim")
    train.add_argument("--agent", choices=["reinforce", "slateq"], required=True)
    train.add_argument("--out", required=True, help="policy file; its curve goes to OUT.png")
    train.add_argument("--steps", type=int, help="user-steps to train (the agent's default;"
                       " a fifth of it with --init)")
    train.add_argument("--init", "--warm-start", dest="init", metavar="PATH",
                       help="continue from this saved policy, its critic and optimiser state")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--threads", type=int, default=2, help="torch threads (0: default)")
    train.add_argument("--eval-episodes", type=int,
                       help="episodes of the final greedy evaluation (the agent's default)")
    p.set_defaults(func=cmd_sim)

    p = sub.add_parser("ingest", help="load an external dataset into the app schema")
    isub = p.add_subparsers(dest="dataset", required=True)
    obd = isub.add_parser("open-bandit", help="a campaign folder of the Open Bandit Dataset")
    obd.add_argument("--path", required=True,
                     help="the campaign folder (random/men), or its policy folder with --campaign")
    obd.add_argument("--campaign", help="the campaign (default: the folder's name)")
    obd.add_argument("--json", action="store_true", help="also print the full summary as JSON")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("ope", help="off-policy evaluation on logged data")
    osub = p.add_subparsers(dest="dataset", required=True)
    obd = osub.add_parser("open-bandit",
                          help="estimate BTS's CTR from random-policy logs, compare with its own")
    obd.add_argument("--random", required=True, help="the random policy's (campaign) folder")
    obd.add_argument("--bts", required=True, help="the BTS policy's (campaign) folder")
    obd.add_argument("--campaign", help="the campaign (default: the random folder's name)")
    obd.add_argument("--prior", help="prior_bts.yaml (default: found beside the folders)")
    obd.add_argument("--n-sim", type=int, default=100_000, help="Monte Carlo draws of BTS")
    obd.add_argument("--n-boot", type=int, default=2000, help="bootstrap replicates")
    obd.add_argument("--seed", type=int, default=0)
    obd.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_ope)

    p = sub.add_parser("airflow", help="run an airflow command with the project's environment")
    p.add_argument("airflow_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_airflow)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return args.func(args)
    except BrokenPipeError:
        # The reader (`| head`) went away: not an error of ours. Point stdout at /dev/null
        # so that the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
