"""The nightly learning steps: refit the choice model, then retrain the agent in its simulator.

Both read the marts dbt built for the run date, write their artifact under
`REC_HOME/models/<run date>/` and record their figures in `rec.model_runs`.
"""

from __future__ import annotations

import copy
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
from rec.features import (
    Items,
    LoggedSlates,
    load_items,
    load_logged_slates,
    load_ratings,
    load_users,
    load_visit_log,
    n_topics,
)

log = logging.getLogger(__name__)

DISTILL_STEPS = 120
"""Steps fitting a new policy to the lookahead (half of them from the champion's weights)."""


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
    """Fit the conditional-logit choice model on the training window's slates, and the
    long-term dynamics (`fit_dynamics`) beside it."""
    from rec.choice import fit_choice_model

    config = config or RunConfig()
    torch.manual_seed(config.seed)
    with db.connect(url) as conn:
        items = load_items(conn, active_only=False)
        slates = load_logged_slates(conn, items)
        topics = n_topics(conn)
        ratings = load_ratings(conn)
        visit_log, log_users = load_visit_log(conn, run_date, items)
    if slates.slate.numel() == 0:
        raise RuntimeError(f"no logged slates before {run_date}: nothing to fit the model on")

    model, metrics = fit_choice_model(choice_data(slates, items), topics, seed=config.seed)
    version = model_version(run_date, run_id)
    path = run_folder(run_date) / "choice.pt"
    model.save(path, metadata={"model_version": version, "run_date": run_date.isoformat()})
    dynamics = fit_dynamics(slates, items, ratings, visit_log, log_users)
    dynamics.save(path.with_name("dynamics.pt"), metadata={"model_version": version})
    metrics = {k: v if isinstance(v, list) else float(v) for k, v in metrics.items()}
    metrics["dynamics"] = dynamics.metrics
    with db.transaction(url) as conn:
        record_run(conn, run_id, run_date, "choice", version, path, json_safe(metrics))
    return json_safe(metrics)


def fit_dynamics(slates: LoggedSlates, items: Items, ratings, visit_log, log_users):
    """The long-term part of the fitted environment, from the same window's logs.

    Booking model on the logged clicks; each user's activity; the retention effect of a
    booking with each expert, regressed on the expert's satisfaction (`rec.retention`).
    """
    from rec.retention import (
        FittedDynamics,
        estimate_activity,
        estimate_retention,
        expert_satisfaction,
        fit_booking_model,
    )

    clicked = slates.clicked.nonzero().squeeze(1)
    state, item = slates.state[clicked], slates.item[clicked]
    topic = items.topic[item]
    booking, booking_metrics = fit_booking_model(
        slates.states.interest[state, topic], slates.states.signup[state, topic],
        items.numeric[item], torch.as_tensor(items.expert_ids, dtype=torch.long)[item],
        slates.booked[clicked].float())
    satisfaction_ids, satisfaction = expert_satisfaction(
        ratings.expert_ids, ratings.rating_sum, ratings.n_reviews)
    retention = estimate_retention(visit_log, satisfaction_ids, satisfaction)
    activity, pooled = estimate_activity(visit_log)
    order = log_users.argsort()
    metrics = {
        "booking": booking_metrics,
        "retention": {"booking_effect": retention.booking_effect,
                      "satisfaction_slope": retention.satisfaction_slope,
                      "baseline_change": retention.baseline_change, **retention.metrics},
        "activity_mean": float(activity.mean()) if len(activity) else pooled,
        "bookings_per_visit": len(visit_log.booking_user) / max(len(visit_log.visit_user), 1),
        "activity_pooled": pooled,
    }
    return FittedDynamics(booking, retention, log_users[order], activity[order], pooled, metrics)


def build_environment(choice_model, dynamics, users, items: Items, config: RunConfig,
                      p_active: float = 1.0):
    """The fitted training environment: the choice model, the booking model, and users whose
    activity moves with the retention effects of their bookings.

    Rewards count bookings (`config.reward == "bookings"`) or bookings weighted by price over
    the mean price (`"revenue"`); clicks are worth nothing in themselves. Without fitted
    dynamics (a choice model from before they existed), every click books at the service's
    smoothed rate and every user is active with probability `p_active`.
    """
    from rec.sim.engine import ActivityModel, BookingResponse, Catalogue, SimEnv, UserState

    expert = torch.as_tensor(items.expert_ids, dtype=torch.long)
    item_value = None
    if config.reward == "revenue":
        price = items.price.clamp(min=0.0)
        item_value = price / price.mean().clamp(min=1e-6)
    response = BookingResponse(items.booking_rate, booking_value=1.0, click_value=0.0,
                               booking_model=dynamics.booking if dynamics else None,
                               item_value=item_value)
    activity_model = None
    if dynamics is not None:
        p_active = dynamics.activity_of(users.user_ids)
        activity_model = ActivityModel(dynamics.retention.of(items.expert_ids))
    return SimEnv(
        population=UserState.from_features(users.interest, users.strength, users.signup),
        catalogue=Catalogue(items.topic, items.numeric, expert),
        choice_model=choice_model,
        response=response,
        horizon=config.horizon,
        p_active=p_active,
        seed=config.seed,
        activity_model=activity_model,
    )


def control_arm(run_date: date, run_id: str, config: RunConfig, url: str | None) -> dict:
    """Publish a baseline instead of the agent: no training, no gate.

    The baseline's policy file becomes the run's `evaluate` artifact, which is what the
    publishing tasks read, so the run publishes it like any champion.
    """
    from rec.agents.baselines import MyopicPolicy, PopularityPolicy
    from rec.choice import ChoiceModel

    started = time.perf_counter()
    with db.connect(url) as conn:
        items = load_items(conn)
        choice_path = latest_artifact(conn, "choice", run_date)
    if config.arm == "myopic":
        if choice_path is None:
            raise RuntimeError(f"no choice model was fitted for {run_date}")
        policy = MyopicPolicy(ChoiceModel.load(choice_path))
    else:
        policy = PopularityPolicy(len(items), items.popularity)
    version = f"{model_version(run_date, run_id)}-{config.arm}"
    path = run_folder(run_date) / f"{config.arm}.pt"
    policy.save(path, metadata={"model_version": version, "run_date": run_date.isoformat(),
                                "arm": config.arm})
    metrics = {"arm": config.arm, "seconds": time.perf_counter() - started}
    with db.transaction(url) as conn:
        record_run(conn, run_id, run_date, "agent", version, path, metrics)
        record_run(conn, run_id, run_date, STAGE, version, path,
                   {"decision": f"control arm {config.arm}", "arm": config.arm})
    log.info("control arm %s for %s: publishing %s", config.arm, run_date, path)
    return metrics


def train_agent(run_date: date, run_id: str, config: RunConfig | None = None,
                url: str | None = None) -> dict:
    """Tonight's agent in the fitted environment, gated (`rec.evaluate`).

    The start policy is the environment's one-step lookahead (today's bookings plus what a
    booking's retention effect is worth later) distilled into a two-tower policy, from the
    champion's weights where they fit; REINFORCE then fine-tunes it on simulated episodes
    of `config.horizon` days, rewarded by bookings. The gate keeps the fine-tuned policy only
    where its paired return beats the start's, and publishes the start otherwise.
    With a control arm (`config.arm` other than `rl`), publish that baseline instead.
    """
    from rec.agents.baselines import MyopicPolicy, PopularityPolicy, RandomPolicy
    from rec.agents.lookahead import DistillArgs, Lookahead, distill
    from rec.agents.reinforce import ReinforceArgs, train_reinforce
    from rec.choice import ChoiceModel
    from rec.policy import TwoTowerPolicy, load_slate_policy
    from rec.retention import FittedDynamics

    config = config or RunConfig()
    if config.arm != "rl":
        return control_arm(run_date, run_id, config, url)
    started = time.perf_counter()
    # Batches of a few hundred users gain nothing from intra-op threads, and on a shared
    # machine they lose a lot to them.
    torch.set_num_threads(1)
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
    dynamics_path = choice_path.with_name("dynamics.pt")
    dynamics = FittedDynamics.load(dynamics_path) if dynamics_path.exists() else None
    slate_size = min(int(choice_model.config["n_positions"]), len(items))
    env = build_environment(choice_model, dynamics, users, items, config,
                            p_active=min(1.0, (visits or 0.0) / max(len(users), 1)) or 1.0)

    # Tonight's start: the lookahead of tonight's environment, distilled into a two-tower
    # policy (from the champion's weights where they fit, else from scratch).
    warm = None
    if previous is not None:
        candidate = load_slate_policy(previous)
        if isinstance(candidate, TwoTowerPolicy) and candidate.config.get(
                "n_topics") == users.interest.shape[1] and candidate.config.get(
                "n_numeric") == items.numeric.shape[1]:
            warm = candidate
            log.info("warm start from %s", previous)
    reward_per_visit = dynamics.metrics.get("bookings_per_visit", 0.1) if dynamics else 0.1
    lookahead = Lookahead(env, reward_per_visit)
    start, distill_metrics = distill(env, lookahead, warm, DistillArgs(
        seed=config.seed, steps=DISTILL_STEPS if warm is None else DISTILL_STEPS // 2))
    version = model_version(run_date, run_id)
    start_version = f"{version}-start"
    start_path = run_folder(run_date) / "start_policy.pt"
    start.save(start_path, metadata={"model_version": start_version,
                                     "run_date": run_date.isoformat(),
                                     "warm_start": str(previous) if warm else None})

    args = ReinforceArgs(seed=config.seed, num_updates=config.agent_steps,
                         slate_size=slate_size, batch_users=min(512, len(users)),
                         learning_rate=1e-3, entropy_coef=0.0, topk_correction=False)
    policy, train_metrics = train_reinforce(env, copy.deepcopy(start), args)

    myopic = MyopicPolicy(choice_model)
    path = run_folder(run_date) / "policy.pt"
    policy.save(path, metadata={"model_version": version, "run_date": run_date.isoformat(),
                                "warm_start": str(start_path)})
    metrics = {
        "final_return": float(train_metrics["final_mean_return"]),
        "reward": config.reward,
        "p_active": float(env.p_active.float().mean()),
        "population_users": len(users),
        "population_cold_start": int(users.cold.sum()),
        "warm_start": warm is not None,
        "distill": distill_metrics,
        "learning_curve": [float(x) for x in train_metrics["learning_curve"]],
        "train_seconds": float(train_metrics["train_seconds"]),
        "args": json.loads(json.dumps(asdict(args))),
    }
    # The gate's champion is tonight's start: fine-tuning is kept only where it beats it.
    # Limitation: in the fitted environments tried so far (2,000 users, 1 to 10 days of logs)
    # 20 to 150 REINFORCE updates left the start's return unchanged or lower, so the
    # published policy is mostly the distilled lookahead, a one-step planner with a value
    # for retention, rather than a policy that policy-gradient updates improved.
    decision = evaluate_challenger(
        env, policy, start_path, slate_size, users, choice_model, config, url,
        {"random": RandomPolicy(config.seed), "myopic": myopic,
         "popularity": PopularityPolicy(len(items), items.popularity)})
    metrics["seconds"] = time.perf_counter() - started
    champion, champion_version = path, version
    if decision["decision"] != "promote":
        champion, champion_version = start_path, start_version
    metrics["decision"] = decision["decision"]
    simulated = decision["simulated"]
    metrics.update({f"{name}_return": simulated[name]["return"]
                    for name in ("random", "myopic", "popularity")})
    metrics["start_return"] = simulated["champion"]["return"]
    metrics["versus_myopic"] = decision["versus"]["myopic"]
    metrics["published_versus_myopic"] = (decision["versus"] if decision["decision"] == "promote"
                                          else decision["champion_versus"])["myopic"]
    decision["challenger_version"] = version
    decision["previous_champion"] = str(previous) if previous else None
    with db.transaction(url) as conn:
        record_run(conn, run_id, run_date, "agent", version, path, json_safe(metrics))
        # The evaluate row names the champion (its file and version) after tonight's decision.
        record_run(conn, run_id, run_date, STAGE, champion_version, champion, decision)
    log.info("agent for %s: %s; gate returns challenger %.3f, start %.3f, myopic %.3f, random"
             " %.3f; published - myopic %s; %.1fs", run_date, decision["decision"],
             simulated["challenger"]["return"], metrics["start_return"],
             metrics["myopic_return"], metrics["random_return"],
             metrics["published_versus_myopic"], metrics["seconds"])
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
