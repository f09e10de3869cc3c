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

    run_demo(days=args.days, users=args.users, experts=args.experts, seed=args.seed,
             as_json=args.json)
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
    p.add_argument("--json", action="store_true", help="also print the figures as JSON")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("recommend", help="print one user's published list")
    p.add_argument("--user", type=int, required=True)
    p.add_argument("--date", type=_date)
    p.set_defaults(func=cmd_recommend)

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
