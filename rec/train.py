"""The nightly learning steps: refit the choice model, then retrain the agent in its simulator.

Both read the marts dbt built for the run date, write their artifact under
`REC_HOME/models/<run date>/` and record their figures in `rec.model_runs`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict
from datetime import date
from pathlib import Path

import psycopg
import torch

from rec import db
from rec.config import RunConfig, artifacts_dir
from rec.evaluate import STAGE, champion_policy_path, gate, json_safe
from rec.features import Items, LoggedSlates, load_items, load_logged_slates, load_users, n_topics

log = logging.getLogger(__name__)


def model_version(run_date: date, run_id: str) -> str:
    """A version naming the date the model serves and the run that made it."""
    return f"{run_date:%Y%m%d}-{hashlib.sha1(run_id.encode()).hexdigest()[:8]}"


def run_folder(run_date: date) -> Path:
    folder = artifacts_dir() / run_date.isoformat()
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def record_run(conn: psycopg.Connection, run_id: str, run_date: date, stage: str,
               version: str, artifact: Path | None, metrics: dict) -> None:
    """Store a stage's figures; a retried task of the same run replaces its row."""
    conn.execute(
        "insert into rec.model_runs (run_id, run_date, stage, model_version, artifact_path,"
        " metrics) values (%s, %s, %s, %s, %s, %s) on conflict (run_id, stage) do update set"
        " model_version = excluded.model_version, artifact_path = excluded.artifact_path,"
        " metrics = excluded.metrics, created_at = now()",
        (run_id, run_date, stage, version, str(artifact) if artifact else None,
         psycopg.types.json.Jsonb(metrics)),
    )


def latest_artifact(conn: psycopg.Connection, stage: str, run_date: date,
                    before: bool = False) -> Path | None:
    """The newest artifact of `stage` for the run date (or, with `before`, an earlier date)."""
    comparison = "<" if before else "="
    rows = conn.execute(
        f"select artifact_path from rec.model_runs where stage = %s and run_date {comparison} %s"
        " and artifact_path is not null order by run_date desc, created_at desc",
        (stage, run_date)).fetchall()
    for (path,) in rows:
        if Path(path).exists():
            return Path(path)
    return None


def choice_data(slates: LoggedSlates, items: Items):
    from rec.choice import ChoiceData

    return ChoiceData(
        interest=slates.states.interest, strength=slates.states.strength,
        signup=slates.states.signup, topic=items.topic, item_numeric=items.numeric,
        slate=slates.slate, user=slates.state, item=slates.item, position=slates.position,
        clicked=slates.clicked.float(), propensity=slates.propensity,
        item_expert=torch.as_tensor(items.expert_ids, dtype=torch.long),
    )


def fit_choice(run_date: date, run_id: str, config: RunConfig | None = None,
               url: str | None = None) -> dict:
    """Fit the conditional-logit choice model on the training window's slates."""
    from rec.choice import fit_choice_model

    config = config or RunConfig()
    torch.manual_seed(config.seed)
    with db.connect(url) as conn:
        items = load_items(conn, active_only=False)
        slates = load_logged_slates(conn, items)
        topics = n_topics(conn)
    if slates.slate.numel() == 0:
        raise RuntimeError(f"no logged slates before {run_date}: nothing to fit the model on")

    model, metrics = fit_choice_model(choice_data(slates, items), topics, seed=config.seed)
    version = model_version(run_date, run_id)
    path = run_folder(run_date) / "choice.pt"
    model.save(path, metadata={"model_version": version, "run_date": run_date.isoformat()})
    metrics = {k: v if isinstance(v, list) else float(v) for k, v in metrics.items()}
    with db.transaction(url) as conn:
        record_run(conn, run_id, run_date, "choice", version, path, metrics)
    return metrics


def train_agent(run_date: date, run_id: str, config: RunConfig | None = None,
                url: str | None = None) -> dict:
    """Retrain the REINFORCE agent from the champion, then gate it (`rec.evaluate`)."""
    from rec.agents.baselines import MyopicPolicy, PopularityPolicy, RandomPolicy
    from rec.agents.reinforce import ReinforceArgs, evaluate_policy, train_reinforce
    from rec.choice import ChoiceModel
    from rec.policy import load_slate_policy
    from rec.sim.engine import BookingResponse, Catalogue, SimEnv, UserState

    config = config or RunConfig()
    started = time.perf_counter()
    with db.connect(url) as conn:
        choice_path = latest_artifact(conn, "choice", run_date)
        # Continuous training: tonight's challenger starts from the current champion.
        previous = champion_policy_path(conn, run_date, before=True) or latest_artifact(
            conn, "agent", run_date, before=True)
        users = load_users(conn)
        items = load_items(conn)
        visits = conn.execute(
            "select count(*)::float / greatest(count(distinct event_date), 1)"
            " from (select distinct user_id, event_date"
            " from analytics.choice_training_slates) v").fetchone()[0]
    if choice_path is None:
        raise RuntimeError(f"no choice model was fitted for {run_date}")
    choice_model = ChoiceModel.load(choice_path)
    slate_size = min(int(choice_model.config["n_positions"]), len(items))

    env = SimEnv(
        population=UserState.from_features(users.interest, users.strength, users.signup),
        catalogue=Catalogue(items.topic, items.numeric,
                            torch.as_tensor(items.expert_ids, dtype=torch.long)),
        choice_model=choice_model,
        response=BookingResponse(items.booking_rate),
        horizon=config.horizon,
        p_active=min(1.0, (visits or 0.0) / max(len(users), 1)) or 1.0,
        seed=config.seed,
    )
    policy = None
    if previous is not None:
        candidate = load_slate_policy(previous)
        if candidate.config.get("n_topics") == users.interest.shape[1] and candidate.config.get(
                "n_numeric") == items.numeric.shape[1]:
            policy = candidate
            log.info("warm start from %s", previous)
    args = ReinforceArgs(seed=config.seed, num_updates=config.agent_steps,
                         slate_size=slate_size, batch_users=min(512, len(users)))
    policy, train_metrics = train_reinforce(env, policy, args)

    n_eval = min(args.eval_users, len(users))
    baselines = {
        "random_return": evaluate_policy(env, RandomPolicy(config.seed), n_eval, slate_size),
        "myopic_return": evaluate_policy(env, MyopicPolicy(choice_model), n_eval, slate_size),
    }
    version = model_version(run_date, run_id)
    path = run_folder(run_date) / "policy.pt"
    policy.save(path, metadata={"model_version": version, "run_date": run_date.isoformat(),
                                "warm_start": str(previous) if previous else None})
    metrics = {
        "final_return": float(train_metrics["final_mean_return"]),
        **baselines,
        "p_active": float(env.p_active),
        "population_users": len(users),
        "population_cold_start": int(users.cold.sum()),
        "warm_start": previous is not None,
        "learning_curve": [float(x) for x in train_metrics["learning_curve"]],
        "args": json.loads(json.dumps(asdict(args))),
        "seconds": time.perf_counter() - started,
    }
    decision = evaluate_challenger(
        env, policy, previous, slate_size, users, choice_model, config, url,
        {"random": RandomPolicy(config.seed), "myopic": MyopicPolicy(choice_model),
         "popularity": PopularityPolicy(len(items), items.popularity)})
    champion, champion_version = path, version
    if decision["decision"] != "promote":
        champion = previous
        champion_version = load_slate_policy(previous).metadata.get("model_version", "")
    metrics["decision"] = decision["decision"]
    decision["challenger_version"] = version
    with db.transaction(url) as conn:
        record_run(conn, run_id, run_date, "agent", version, path, metrics)
        # The evaluate row names the champion (its file and version) after tonight's decision.
        record_run(conn, run_id, run_date, STAGE, champion_version, champion, decision)
    log.info("agent for %s: return %.3f (myopic %.3f, random %.3f) in %.1fs", run_date,
             metrics["final_return"], baselines["myopic_return"], baselines["random_return"],
             metrics["seconds"])
    return {k: v for k, v in metrics.items() if k != "learning_curve"}


def evaluate_challenger(env, challenger, champion_path: Path | None, slate_size: int, users,
                        choice_model, config: RunConfig, url: str | None,
                        baselines: dict) -> dict:
    """Gate tonight's challenger against the champion and the baselines (`rec.evaluate`)."""
    from rec.policy import load_slate_policy

    champion = None
    if champion_path is not None:
        candidate = load_slate_policy(champion_path)
        if candidate.config == challenger.config:
            champion = candidate
    with db.connect(url) as conn:
        items_all = load_items(conn, active_only=False)
        logged = load_logged_slates(conn, items_all)
    result = gate(env, challenger, champion, baselines, slate_size, cold=users.cold,
                  logged=logged, items=items_all, choice_model=choice_model)
    result["champion_before"] = str(champion_path) if champion is not None else None
    return json_safe(result)
