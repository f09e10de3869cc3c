"""One simulated day of app traffic, written into the `app` schema.

Each user who still has days of interest left opens the app with their daily
probability, sees a slate (the top of today's published list, or a popularity
ranking where there is none), clicks at most one service by a multinomial logit
over their hidden interests, and may book it, like it and review the session.

What a visit was worth to the user (their satisfaction) has consequences that the
pipeline sees only through future events: a visit with nothing worth clicking
spends part of their patience, a booked session adds to it in proportion to how
good it was (its rating, driven by the expert's hidden quality), and both the
remaining days (the budget) and the daily visit probability follow. A user whose
budget runs out churns. Interests drift towards what users consume, and some
users' interests jump to a new topic at a daily rate.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

import numpy as np
import psycopg
import torch

from rec.db import copy_rows
from rec.sim.engine import sample_slate_choice
from rec.world.generate import TRUTH_COLUMNS, WorldSpec, draw_users, world_spec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Behaviour:
    """How the world's users respond; hidden from the pipeline."""

    slate_size: int = 10
    """Services shown per visit: the top of the user's list."""
    interest_weight: float = 4.0
    """Utility of a service per unit of the user's latent interest in its topic."""
    quality_weight: float = 0.3
    """Utility per unit of the expert's hidden quality (users partly see reputation)."""
    price_weight: float = 0.3
    """Disutility per unit of log price relative to 60."""
    position_decay: float = 0.15
    """Utility lost per position down the slate."""
    no_click_utility: float = 4.0
    """Utility of leaving without a click."""
    booking_bias: float = -1.5
    booking_interest: float = 3.0
    booking_quality: float = 0.4
    review_probability: float = 0.6
    rating_mean: float = 3.6
    """Mean rating of a session with an expert of average quality."""
    rating_per_quality: float = 0.9
    """Rating points per unit of the expert's hidden quality."""
    empty_visit_satisfaction: float = -0.5
    """Satisfaction of a visit that ends without a click (a wasted visit)."""
    neutral_rating: float = 3.0
    """A booked session rated above this satisfies the user, below it disappoints."""
    budget_days_per_satisfaction: float = 2.0
    """Days of activity gained (lost) per unit of a visit's satisfaction."""
    activity_per_satisfaction: float = 0.01
    """Change of the daily visit probability per unit of a visit's satisfaction."""
    interest_drift: float = 0.08
    """Share of interest that moves to a booked session's topic."""
    click_drift: float = 0.02
    """Share of interest that moves to a clicked (not booked) service's topic."""


@dataclass
class WorldState:
    user_ids: np.ndarray
    interests: torch.Tensor
    activity: torch.Tensor
    budget: torch.Tensor
    churned: torch.Tensor
    service_ids: np.ndarray
    service_topic: torch.Tensor
    service_quality: torch.Tensor
    service_price: torch.Tensor


def slate_utility(state: WorldState, behaviour: Behaviour, users: torch.Tensor,
                  slates: torch.Tensor) -> torch.Tensor:
    """(B, K) hidden utility of each shown service for users `users` (indices into state)."""
    interest = state.interests[users].gather(1, state.service_topic[slates])
    return (
        behaviour.interest_weight * interest
        + behaviour.quality_weight * state.service_quality[slates]
        - behaviour.price_weight * torch.log(state.service_price[slates] / 60.0)
        - behaviour.position_decay * torch.arange(slates.shape[1], dtype=torch.float32)
    )


def click_probability(state: WorldState, behaviour: Behaviour, users: torch.Tensor,
                      slates: torch.Tensor) -> torch.Tensor:
    """(B,) each visit's chance of a click on its slate: the logit's mass off no-click."""
    logits = slate_utility(state, behaviour, users, slates)
    no_click = torch.full((len(users), 1), behaviour.no_click_utility)
    return 1.0 - torch.softmax(torch.cat([logits, no_click], dim=1), dim=1)[:, -1]


def load_state(conn: psycopg.Connection) -> WorldState:
    """The world's hidden state as stored: users' truth and the active catalogue's."""
    users = conn.execute(
        "select user_id, interests, activity, budget, churned_on is not null"
        " from world.user_truth order by user_id"
    ).fetchall()
    services = conn.execute(
        "select s.service_id, s.topic_id, t.quality, s.price"
        " from app.services s join world.expert_truth t using (expert_id)"
        " where s.is_active order by s.service_id"
    ).fetchall()
    return WorldState(
        user_ids=np.array([u[0] for u in users], dtype=np.int64),
        interests=torch.tensor([u[1] for u in users], dtype=torch.float32),
        activity=torch.tensor([u[2] for u in users], dtype=torch.float32),
        budget=torch.tensor([u[3] for u in users], dtype=torch.float32),
        churned=torch.tensor([u[4] for u in users], dtype=torch.bool),
        service_ids=np.array([s[0] for s in services], dtype=np.int64),
        service_topic=torch.tensor([s[1] for s in services], dtype=torch.long),
        service_quality=torch.tensor([s[2] for s in services], dtype=torch.float32),
        service_price=torch.tensor([float(s[3]) for s in services], dtype=torch.float32),
    )


def _published_slates(
    conn: psycopg.Connection, day: date, k: int
) -> tuple[dict[int, tuple[list[int], list[float]]], str | None]:
    """Each user's top-k of the latest list published for `day` or before."""
    run_date = conn.execute(
        "select max(run_date) from rec.recommendations where run_date <= %s", (day,)
    ).fetchone()[0]
    if run_date is None:
        return {}, None
    rows = conn.execute(
        "select user_id, array_agg(service_id order by rank),"
        " array_agg(propensity order by rank), max(model_version)"
        " from rec.recommendations where run_date = %s and rank <= %s group by user_id",
        (run_date, k),
    ).fetchall()
    version = rows[0][3] if rows else None
    return {r[0]: (r[1], r[2]) for r in rows}, version


def _popularity_weights(conn: psycopg.Connection, day: date, service_ids: np.ndarray):
    counts = dict(conn.execute(
        "select service_id, count(*) from app.bookings"
        " where booked_at >= %s and booked_at < %s group by service_id",
        (day - timedelta(days=28), day),
    ).fetchall())
    return torch.tensor([counts.get(int(s), 0) + 1.0 for s in service_ids])


def _plackett_luce_sample(
    weights: torch.Tensor, n_rows: int, k: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """k items without replacement per row, with each slot's conditional propensity."""
    keys = torch.log(weights).expand(n_rows, -1) + _gumbel((n_rows, weights.numel()), generator)
    chosen = keys.topk(k, dim=1).indices
    picked_weights = weights[chosen]
    remaining = weights.sum() - torch.cumsum(picked_weights, dim=1) + picked_weights
    return chosen, picked_weights / remaining


def _gumbel(shape, generator: torch.Generator) -> torch.Tensor:
    uniform = torch.rand(shape, generator=generator).clamp_(1e-12, 1 - 1e-12)
    return -torch.log(-torch.log(uniform))


def _jump_interests(
    state: WorldState, behaviour: Behaviour, rate: float, generator: torch.Generator
) -> list[tuple[int, int, int]]:
    """Move some users' favourite interest to another topic; returns the jumps.

    A jump trades the weights of the user's favourite topic and of a topic drawn among the
    others: the new topic becomes the favourite with the old one's weight, and the old
    favourite keeps what the new topic had (usually next to nothing). The shape of the
    user's interests is unchanged, so a ranking that follows the jump can reach the CTR
    it had before; only a list still aimed at the old favourite loses clicks.
    """
    n_users, n_topics = state.interests.shape
    draws = torch.rand(n_users, generator=generator)
    targets = torch.randint(0, n_topics - 1, (n_users,), generator=generator)
    jumping = ((draws < rate) & ~state.churned).nonzero().squeeze(1)
    if len(jumping) == 0:
        return []
    old_top = state.interests[jumping].argmax(dim=1)
    # A topic drawn among the others: skip over the current favourite.
    new_topic = targets[jumping] + (targets[jumping] >= old_top).long()
    top_weight = state.interests[jumping, old_top].clone()
    state.interests[jumping, old_top] = state.interests[jumping, new_topic]
    state.interests[jumping, new_topic] = top_weight
    return [(int(state.user_ids[u]), int(a), int(b)) for u, a, b in zip(
        jumping.tolist(), old_top.tolist(), new_topic.tolist(), strict=True)]


def _serve_slates(conn, day, state, active_idx, k, generator):
    """Each visitor's slate: their published list where complete, else popularity."""
    index_of_service = {int(s): i for i, s in enumerate(state.service_ids)}
    n_active = len(active_idx)
    published, version = _published_slates(conn, day, k)
    slates, propensity = _plackett_luce_sample(
        _popularity_weights(conn, day, state.service_ids), n_active, k, generator)
    source = ["popularity"] * n_active
    for row, u in enumerate(active_idx.tolist()):
        entry = published.get(int(state.user_ids[u]))
        if entry is None:
            continue
        items = [index_of_service.get(s) for s in entry[0]]
        if len(items) < k or any(i is None for i in items):
            continue
        slates[row] = torch.tensor(items[:k])
        propensity[row] = torch.tensor(entry[1][:k])
        source[row] = f"rec:{version}"
    return slates, propensity, source


def simulate_day(
    conn: psycopg.Connection, day: date, behaviour: Behaviour | None = None
) -> dict[str, int | float]:
    """Play one day of the world against what is published for it. Refuses a replay.

    Returns:
        The day's counts: visits, impressions, clicks, likes, bookings, reviews, revenue,
        new_users, jumps, churned (users whose budget ran out today) and active_users
        (users with budget left at the end of the day).
    """
    behaviour = behaviour or Behaviour()
    started = time.perf_counter()
    spec = world_spec(conn)
    if spec is None:
        raise RuntimeError("no world is seeded in this database: run `rec world seed` first")
    if conn.execute("select 1 from world.days where day = %s", (day,)).fetchone():
        raise RuntimeError(f"world day {day} was already simulated; a day is played once")
    generator = torch.Generator().manual_seed(spec.seed * 1_000_003 + day.toordinal())
    rng = np.random.default_rng([spec.seed, day.toordinal()])

    state = load_state(conn)
    jumps = _jump_interests(state, behaviour, spec.jump_rate, generator)
    k = min(behaviour.slate_size, len(state.service_ids))

    visiting = torch.rand(len(state.user_ids), generator=generator) < state.activity
    active_idx = (visiting & ~state.churned).nonzero().squeeze(1)
    slates, propensity, source = _serve_slates(conn, day, state, active_idx, k, generator)

    # Choices by the hidden multinomial logit.
    interest = state.interests[active_idx].gather(1, state.service_topic[slates])
    utility = slate_utility(state, behaviour, active_idx, slates)
    choice = sample_slate_choice(utility, behaviour.no_click_utility, generator)
    clicked_rows = (choice >= 0).nonzero().squeeze(1)
    clicked_item = slates[clicked_rows, choice[clicked_rows]]
    clicked_interest = interest[clicked_rows, choice[clicked_rows]]
    quality = state.service_quality[clicked_item]

    booking_logit = (
        behaviour.booking_bias + behaviour.booking_interest * clicked_interest
        + behaviour.booking_quality * quality
        - behaviour.price_weight * torch.log(state.service_price[clicked_item] / 60.0)
    )
    booked = torch.rand(len(clicked_rows), generator=generator) < torch.sigmoid(booking_logit)
    liked = torch.rand(len(clicked_rows), generator=generator) < torch.sigmoid(
        quality + 2.0 * clicked_interest - 1.0)
    rating = (behaviour.rating_mean + behaviour.rating_per_quality * quality
              + 0.6 * torch.randn(len(clicked_rows), generator=generator))
    rating = rating.round().clamp(1, 5)
    reviewed = booked & (
        torch.rand(len(clicked_rows), generator=generator) < behaviour.review_probability)

    churned_today = _consequences(state, behaviour, active_idx, clicked_rows, clicked_item,
                                  booked, rating)

    counts = _write_day(conn, day, rng, state, active_idx, slates, propensity, source,
                        clicked_rows, clicked_item, booked, liked, rating, reviewed)
    counts["jumps"] = len(jumps)
    counts["churned"] = int(churned_today.sum())
    counts["active_users"] = int((~state.churned).sum())
    counts["new_users"] = _sign_up_new_users(conn, day, spec, rng)
    counts["active_users"] += counts["new_users"]
    _store_truth(conn, state, day, churned_today)
    copy_rows(conn, "world.interest_jumps", ("user_id", "day", "from_topic", "to_topic"),
              ((u, day, a, b) for u, a, b in jumps))
    conn.execute("insert into world.days (day, counts) values (%s, %s)",
                 (day, psycopg.types.json.Jsonb(counts)))
    log.info("world day %s: %d visits, %d clicks, %d bookings, %d jumps, %d churned,"
             " %d new, %d active users in %.1fs", day, counts["visits"], counts["clicks"],
             counts["bookings"], counts["jumps"], counts["churned"], counts["new_users"],
             counts["active_users"], time.perf_counter() - started)
    return counts


def _consequences(state: WorldState, behaviour: Behaviour, active_idx: torch.Tensor,
                  clicked_rows: torch.Tensor, clicked_item: torch.Tensor,
                  booked: torch.Tensor, rating: torch.Tensor) -> torch.Tensor:
    """Satisfaction moves budgets and visit probabilities; interests drift. Returns churners."""
    satisfaction = torch.full((len(active_idx),), behaviour.empty_visit_satisfaction)
    satisfaction[clicked_rows] = 0.0
    booked_rows = clicked_rows[booked]
    satisfaction[booked_rows] = rating[booked] - behaviour.neutral_rating

    # A day passes for everyone; visitors gain or lose days by what the visit was worth.
    state.budget -= 1.0
    state.budget[active_idx] += behaviour.budget_days_per_satisfaction * satisfaction
    state.activity[active_idx] = (
        state.activity[active_idx] + behaviour.activity_per_satisfaction * satisfaction
    ).clamp(0.02, 0.95)
    churned_today = (state.budget <= 0) & ~state.churned
    state.churned |= churned_today

    # Interests drift towards what was consumed: strongly for bookings, a little for clicks.
    shares = torch.where(booked, behaviour.interest_drift, behaviour.click_drift)
    users = active_idx[clicked_rows]
    topics = state.service_topic[clicked_item]
    state.interests[users] *= (1.0 - shares).unsqueeze(1)
    state.interests[users, topics] += shares
    return churned_today


def _write_day(conn, day, rng, state, active_idx, slates, propensity, source,
               clicked_rows, clicked_item, booked, liked, rating, reviewed) -> dict[str, int]:
    midnight = datetime(day.year, day.month, day.day, tzinfo=UTC)
    n_active, k = slates.shape
    visit_at = [midnight + timedelta(seconds=float(s))
                for s in rng.uniform(0, 86_000, size=n_active)]
    slate_ids = [uuid.UUID(bytes=rng.bytes(16), version=4) for _ in range(n_active)]
    user_ids = state.user_ids[active_idx.numpy()]
    service_ids = state.service_ids

    slates_np, prop_np = slates.numpy(), propensity.numpy()
    impressions = (
        (slate_ids[r], int(user_ids[r]), int(service_ids[slates_np[r, p]]), p,
         float(prop_np[r, p]), source[r], visit_at[r])
        for r in range(n_active) for p in range(k)
    )
    n_impressions = copy_rows(conn, "app.impressions", (
        "slate_id", "user_id", "service_id", "position", "propensity", "source", "shown_at"),
        impressions)

    events, bookings = [], []
    rows, items = clicked_rows.tolist(), clicked_item.tolist()
    for j, (r, item) in enumerate(zip(rows, items, strict=True)):
        user, service = int(user_ids[r]), int(service_ids[item])
        clicked_at = visit_at[r] + timedelta(seconds=20)
        events.append(("click", user, service, slate_ids[r], clicked_at, None))
        if liked[j]:
            events.append(("like", user, service, slate_ids[r],
                           clicked_at + timedelta(seconds=40), None))
        if booked[j]:
            price = round(float(state.service_price[item]), 2)
            bookings.append((j, user, service, slate_ids[r], price,
                             clicked_at + timedelta(seconds=90)))
    copy_rows(conn, "app.events", ("event_type", "user_id", "service_id", "slate_id",
                                   "occurred_at", "payload"), events)

    booking_ids = [r[0] for r in conn.execute(
        "select nextval(pg_get_serial_sequence('app.bookings', 'booking_id'))"
        " from generate_series(1, %s)", (len(bookings),)).fetchall()]
    copy_rows(conn, "app.bookings", ("booking_id", "user_id", "service_id", "slate_id",
                                     "price", "booked_at"),
              ((bid, *b[1:]) for bid, b in zip(booking_ids, bookings, strict=True)))
    reviews = []
    for bid, (j, user, service, _, _, booked_at) in zip(booking_ids, bookings, strict=True):
        if reviewed[j]:
            stars = int(rating[j])
            reviews.append((bid, user, service, stars, f"{stars} stars",
                            min(booked_at + timedelta(hours=1), midnight + timedelta(
                                hours=23, minutes=59))))
    copy_rows(conn, "app.reviews", ("booking_id", "user_id", "service_id", "rating", "body",
                                    "created_at"), reviews)
    return {
        "visits": n_active,
        "impressions": n_impressions,
        "clicks": len(rows),
        "likes": int(liked.sum()),
        "bookings": len(bookings),
        "reviews": len(reviews),
        "revenue": round(sum(b[4] for b in bookings), 2),
    }


def _sign_up_new_users(conn, day: date, spec: WorldSpec, rng: np.random.Generator) -> int:
    """New users sign up during the day; they first visit tomorrow."""
    count = int(rng.poisson(spec.new_users_per_day * spec.users))
    if count == 0:
        return 0
    first_id = conn.execute("select coalesce(max(user_id), 0) + 1 from app.users").fetchone()[0]
    n_topics = conn.execute("select count(*) from app.topics").fetchone()[0]
    users, truth = draw_users(rng, count, first_id, n_topics, day, spec.mean_budget_days)
    copy_rows(conn, "app.users", ("user_id", "signed_up_at", "signup_topics"), users)
    copy_rows(conn, "world.user_truth", TRUTH_COLUMNS, truth)
    return count


def _store_truth(conn: psycopg.Connection, state: WorldState, day: date,
                 churned_today: torch.Tensor) -> None:
    conn.execute("create temporary table truth_update (like world.user_truth) on commit drop")
    churn_day = [day if c else None for c in churned_today.tolist()]
    copy_rows(conn, "truth_update", (*TRUTH_COLUMNS, "churned_on"), (
        (int(u), i, float(a), float(b), c) for u, i, a, b, c in zip(
            state.user_ids, state.interests.tolist(), state.activity.tolist(),
            state.budget.tolist(), churn_day, strict=True)))
    conn.execute(
        "update world.user_truth t set interests = u.interests, activity = u.activity,"
        " budget = u.budget, churned_on = coalesce(t.churned_on, u.churned_on)"
        " from truth_update u where t.user_id = u.user_id"
    )
    conn.execute("drop table truth_update")
