"""Reading the dbt marts into tensors: users, services and logged slates.

Users and services become rows of dense tensors indexed like their id arrays, so
that the choice model, the simulator and the publisher share one layout.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import date

import numpy as np
import psycopg
import torch

log = logging.getLogger(__name__)

ITEM_NUMERIC_COLUMNS = ("log_price", "ctr_logit", "rating_centered", "log_bookings")


@dataclass
class Users:
    """One row per user; `interest` rows are topic shares (all zero with neither history nor
    sign-up topics); `cold` marks users without interactions."""

    user_ids: np.ndarray
    interest: torch.Tensor
    strength: torch.Tensor
    signup: torch.Tensor
    cold: torch.Tensor

    def __len__(self) -> int:
        return len(self.user_ids)


@dataclass
class Items:
    """One row per service, with features computed from the marts alone."""

    service_ids: np.ndarray
    expert_ids: np.ndarray
    topic: torch.Tensor
    numeric: torch.Tensor
    booking_rate: torch.Tensor
    popularity: torch.Tensor
    price: torch.Tensor | None = None
    """(S,) price of one session."""

    def __len__(self) -> int:
        return len(self.service_ids)


@dataclass
class Ratings:
    """Per-service review totals: what experts' satisfaction is estimated from."""

    expert_ids: np.ndarray
    rating_sum: np.ndarray
    n_reviews: np.ndarray


@dataclass
class LoggedSlates:
    """Impressions of the training window; `state` indexes the point-in-time user states."""

    slate: torch.Tensor
    state: torch.Tensor
    item: torch.Tensor
    position: torch.Tensor
    clicked: torch.Tensor
    booked: torch.Tensor
    states: Users
    propensity: torch.Tensor | None = None
    """(N,) the serving policy's probability of each impression; NaN where none was logged."""


def n_topics(conn: psycopg.Connection) -> int:
    return conn.execute("select coalesce(max(topic_id), -1) + 1 from analytics.stg_app__topics"
                        ).fetchone()[0]


def _interest_matrix(rows, index: dict, shape: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    interest = torch.zeros(shape)
    weight = torch.zeros(shape[0])
    for key, topic, decayed, share in rows:
        row = index[key]
        interest[row, topic] = share
        weight[row] += decayed
    return interest, torch.log1p(weight)


def _signup_matrix(signups: list[list[int] | None], topics: int) -> torch.Tensor:
    signup = torch.zeros(len(signups), topics)
    for row, picked in enumerate(signups):
        for topic in picked or ():
            if 0 <= topic < topics:
                signup[row, topic] = 1.0
    return signup


def load_users(conn: psycopg.Connection, user_range: tuple[int, int] | None = None) -> Users:
    """Every user of the `user_features` mart (or those with ids in user_range, inclusive),
    with their current interests."""
    topics = n_topics(conn)
    first, last = user_range or (None, None)
    within = " where (%(first)s::bigint is null or user_id between %(first)s and %(last)s)"
    bounds = {"first": first, "last": last}
    rows = conn.execute("select user_id, signup_topics, is_cold_start"
                        " from analytics.user_features" + within + " order by user_id",
                        bounds).fetchall()
    user_ids = np.array([r[0] for r in rows], dtype=np.int64)
    index = {int(u): i for i, u in enumerate(user_ids)}
    interest, strength = _interest_matrix(conn.execute(
        "select user_id, topic_id, decayed_weight, interest"
        " from analytics.user_interest_features" + within, bounds).fetchall(), index,
        (len(rows), topics))
    return Users(user_ids, interest, strength, _signup_matrix([r[1] for r in rows], topics),
                 torch.tensor([bool(r[2]) for r in rows]))


def load_items(conn: psycopg.Connection, active_only: bool = True) -> Items:
    """Services with standardised numeric features (fixed transforms, no fitted scaling)."""
    rows = conn.execute(
        "select service_id, expert_id, topic_id, price, ctr_smoothed, avg_rating_smoothed,"
        " bookings, booking_rate_smoothed from analytics.expert_features"
        + (" where is_active" if active_only else "") + " order by service_id").fetchall()
    price = np.array([float(r[3]) for r in rows])
    ctr = np.array([float(r[4]) for r in rows])
    numeric = np.stack([
        np.log(np.maximum(price, 1.0) / 60.0),
        np.log(ctr / (1.0 - ctr)),
        np.array([float(r[5]) for r in rows]) - 3.5,
        np.log1p(np.array([float(r[6]) for r in rows])),
    ], axis=1) if rows else np.zeros((0, len(ITEM_NUMERIC_COLUMNS)))
    return Items(
        service_ids=np.array([r[0] for r in rows], dtype=np.int64),
        expert_ids=np.array([r[1] for r in rows], dtype=np.int64),
        topic=torch.tensor([r[2] for r in rows], dtype=torch.long),
        numeric=torch.tensor(numeric, dtype=torch.float32),
        booking_rate=torch.tensor([float(r[7]) for r in rows], dtype=torch.float32),
        popularity=torch.tensor([float(r[6]) for r in rows], dtype=torch.float32),
        price=torch.tensor(price, dtype=torch.float32),
    )


def load_logged_slates(conn: psycopg.Connection, items: Items) -> LoggedSlates:
    """The training window's impressions, each pointing at its user's state that day."""
    topics = n_topics(conn)
    rows = conn.execute(
        "select s.slate_id, s.user_id, s.event_date, s.service_id, s.position, s.clicked,"
        " s.booked, u.signup_topics, s.propensity from analytics.choice_training_slates s"
        " left join analytics.user_features u using (user_id)"
        " order by s.event_date, s.slate_id, s.position").fetchall()
    item_index = {int(s): i for i, s in enumerate(items.service_ids)}
    rows = [r for r in rows if int(r[3]) in item_index]
    state_index: dict[tuple[int, date], int] = {}
    slate_index: dict[object, int] = {}
    signups = []
    for r in rows:
        if (r[1], r[2]) not in state_index:
            state_index[(r[1], r[2])] = len(state_index)
            signups.append(r[7])
        slate_index.setdefault(r[0], len(slate_index))
    interest, strength = _interest_matrix(
        (((u, d), t, w, i) for u, d, t, w, i in conn.execute(
            "select user_id, event_date, topic_id, decayed_weight, interest"
            " from analytics.choice_user_states").fetchall() if (u, d) in state_index),
        state_index, (len(state_index), topics))
    # A state is cold when the user had not interacted before its day (the sign-up topics'
    # prior gives cold states interests too, so their interests cannot tell).
    first_active = dict(conn.execute(
        "select user_id, min(event_date) from ("
        " select user_id, event_date from analytics.stg_app__clicks union all"
        " select user_id, event_date from analytics.stg_app__likes union all"
        " select user_id, event_date from analytics.stg_app__bookings union all"
        " select user_id, event_date from analytics.stg_app__reviews) interactions"
        " group by user_id").fetchall())
    states = Users(
        user_ids=np.array([k[0] for k in state_index], dtype=np.int64),
        interest=interest, strength=strength, signup=_signup_matrix(signups, topics),
        cold=torch.tensor([first_active.get(user) is None or first_active[user] >= day
                           for user, day in state_index], dtype=torch.bool))
    log.info("loaded %d impressions in %d slates over %d user-days", len(rows),
             len(slate_index), len(state_index))
    return LoggedSlates(
        slate=torch.tensor([slate_index[r[0]] for r in rows], dtype=torch.long),
        state=torch.tensor([state_index[(r[1], r[2])] for r in rows], dtype=torch.long),
        item=torch.tensor([item_index[int(r[3])] for r in rows], dtype=torch.long),
        position=torch.tensor([r[4] for r in rows], dtype=torch.long),
        clicked=torch.tensor([bool(r[5]) for r in rows]),
        booked=torch.tensor([bool(r[6]) for r in rows]),
        states=states,
        propensity=torch.tensor(
            [float("nan") if r[8] is None else float(r[8]) for r in rows], dtype=torch.float64
        ),
    )


def load_ratings(conn: psycopg.Connection) -> Ratings:
    """Every service's expert, rating sum and review count (`expert_features`)."""
    rows = conn.execute("select expert_id, rating_sum, n_reviews from analytics.expert_features"
                        " order by service_id").fetchall()
    return Ratings(np.array([r[0] for r in rows], dtype=np.int64),
                   np.array([float(r[1]) for r in rows]), np.array([float(r[2]) for r in rows]))


def load_visit_log(conn: psycopg.Connection, run_date: date, items: Items):
    """Visits (user-days with a slate) and bookings of the training window, as day indices.

    The window runs from the first day of `choice_training_slates` to the day before the run
    date. Users are those of `user_features`, in its order; a user who signed up inside the
    window is observed from that day on.

    Returns:
        A `rec.retention.VisitLog` and (U,) the user ids its rows stand for.
    """
    from rec.retention import VisitLog

    users = conn.execute("select user_id, signed_up_at::date from analytics.user_features"
                         " order by user_id").fetchall()
    visits = conn.execute("select distinct user_id, event_date"
                          " from analytics.choice_training_slates").fetchall()
    bookings = conn.execute("select user_id, event_date, service_id"
                            " from analytics.choice_training_slates where booked").fetchall()
    start = min((d for _, d in visits), default=run_date)
    n_days = max((run_date - start).days, 0)
    user_ids = np.array([u for u, _ in users], dtype=np.int64)
    row_of = {int(u): i for i, u in enumerate(user_ids)}
    expert_of = dict(zip(items.service_ids.tolist(), items.expert_ids.tolist(), strict=True))
    first_day = np.array([max((d - start).days, 0) for _, d in users], dtype=np.int64)
    visits = [(row_of[u], (d - start).days) for u, d in visits
              if u in row_of and 0 <= (d - start).days < n_days]
    bookings = [(row_of[u], (d - start).days, expert_of[s]) for u, d, s in bookings
                if u in row_of and s in expert_of and 0 <= (d - start).days < n_days]
    visit_array = np.array(visits, dtype=np.int64).reshape(-1, 2)
    booking_array = np.array(bookings, dtype=np.int64).reshape(-1, 3)
    log.info("visit log: %d users, %d days, %d visits, %d bookings", len(user_ids), n_days,
             len(visit_array), len(booking_array))
    return VisitLog(n_days, np.minimum(first_day, n_days), visit_array[:, 0], visit_array[:, 1],
                    booking_array[:, 0], booking_array[:, 1], booking_array[:, 2]), user_ids
