"""The simulated world's population: topics, experts, services and users.

The world plays the app's users for the demo and for evaluation. Its ground
truth (each user's latent interests and activity, each expert's quality) lives
in the `world` schema, which the pipeline never reads: the pipeline learns
about users only through the events the world writes into `app`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime, timedelta

import numpy as np
import psycopg

from rec.db import copy_rows

log = logging.getLogger(__name__)

TOPICS = (
    "startup funding",
    "leadership",
    "fitness coaching",
    "cooking",
    "career change",
    "public speaking",
    "nutrition",
    "personal finance",
    "product management",
    "mindfulness",
    "language learning",
    "parenting",
)

FIRST_NAMES = ("Ada", "Bea", "Cai", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun", "Kia", "Lev")
LAST_NAMES = ("Moreau", "Okafor", "Silva", "Tanaka", "Novak", "Haddad", "Berg", "Lind", "Rossi")
SERVICE_KINDS = ("1:1 session", "deep dive", "group clinic", "review call")

WORLD_SCHEMA_SQL = """
create schema if not exists world;
create table if not exists world.settings (
    key text primary key,
    value jsonb not null
);
create table if not exists world.user_truth (
    user_id bigint primary key,
    interests real[] not null,
    activity real not null
);
-- Days of activity a user has left: time spends it, good sessions add to it; at zero the
-- user churns and never comes back (RecSim's time budget, counted in days).
alter table world.user_truth add column if not exists budget real not null default 40;
alter table world.user_truth add column if not exists churned_on date;
-- Each sudden change of a user's interests to a new topic, for the experiment's report.
create table if not exists world.interest_jumps (
    user_id bigint not null,
    day date not null,
    from_topic smallint not null,
    to_topic smallint not null,
    primary key (user_id, day)
);
create table if not exists world.expert_truth (
    expert_id integer primary key,
    quality real not null
);
create table if not exists world.days (
    day date primary key,
    counts jsonb not null,
    simulated_at timestamptz not null default now()
);
"""


TRUTH_COLUMNS = ("user_id", "interests", "activity", "budget")


@dataclass(frozen=True)
class WorldSpec:
    """The size and seed of a world; the same spec always builds the same world."""

    users: int = 1000
    experts: int = 60
    seed: int = 0
    start_date: date = date(2026, 1, 1)
    new_users_per_day: float = 0.01
    """New sign-ups per day, as a share of the initial population."""
    jump_rate: float = 0.005
    """Daily probability that a user's interests jump to a topic they did not care about."""
    mean_budget_days: float = 40.0
    """Mean days of activity a user starts with (Gamma distributed, shape 4)."""

    def to_json(self) -> str:
        values = asdict(self)
        values["start_date"] = self.start_date.isoformat()
        return json.dumps(values)

    @classmethod
    def from_json(cls, text: str | dict) -> WorldSpec:
        values = json.loads(text) if isinstance(text, str) else dict(text)
        values["start_date"] = date.fromisoformat(values["start_date"])
        return cls(**values)


def draw_users(
    rng: np.random.Generator, count: int, first_id: int, n_topics: int, signed_up_on: date,
    mean_budget_days: float = 40.0,
) -> tuple[list[tuple], list[tuple]]:
    """Draw `count` users: their app rows and their hidden truth rows.

    Latent interests are a sparse Dirichlet draw (most users care about one to
    three topics). At sign-up a user ticks the topics they think they like:
    their strongest interests seen through noise. Each user also gets a daily
    visit probability (`activity`) and a budget of days before they lose interest.

    Returns:
        (user_id, signed_up_at, signup_topics) rows for `app.users` and
        (user_id, interests, activity, budget) rows for `world.user_truth`.
    """
    interests = rng.dirichlet(np.full(n_topics, 0.35), size=count)
    activity = rng.beta(2.0, 5.0, size=count)
    budget = rng.gamma(4.0, mean_budget_days / 4.0, size=count)
    noisy = np.log(interests + 1e-6) + rng.gumbel(size=interests.shape)
    n_picked = rng.integers(1, 4, size=count)
    app_rows, truth_rows = [], []
    midnight = datetime(signed_up_on.year, signed_up_on.month, signed_up_on.day, tzinfo=UTC)
    for i in range(count):
        user_id = first_id + i
        picked = np.argsort(-noisy[i])[: n_picked[i]]
        signed_up_at = midnight + timedelta(seconds=float(rng.uniform(0, 86_399)))
        app_rows.append((user_id, signed_up_at, sorted(int(t) for t in picked)))
        truth_rows.append((user_id, interests[i].astype(np.float32).tolist(),
                           float(activity[i]), float(budget[i])))
    return app_rows, truth_rows


def seed_world(conn: psycopg.Connection, spec: WorldSpec) -> None:
    """Create the world's catalogue, users and hidden truth. Refuses a second seeding."""
    conn.execute(WORLD_SCHEMA_SQL)
    existing = conn.execute("select value from world.settings where key = 'spec'").fetchone()
    if existing is not None:
        raise RuntimeError(f"a world is already seeded here: {existing[0]}")

    rng = np.random.default_rng(spec.seed)
    n_topics = len(TOPICS)
    epoch = datetime(spec.start_date.year, spec.start_date.month, spec.start_date.day,
                     tzinfo=UTC) - timedelta(days=90)

    copy_rows(conn, "app.topics", ("topic_id", "name"), enumerate(TOPICS))

    topic_popularity = rng.dirichlet(np.full(n_topics, 3.0))
    expert_topics = rng.choice(n_topics, size=spec.experts, p=topic_popularity)
    quality = rng.normal(0.0, 1.0, size=spec.experts)
    experts, services, truth = [], [], []
    service_id = 1
    for e in range(spec.experts):
        expert_id = e + 1
        name = f"{FIRST_NAMES[e % len(FIRST_NAMES)]} {LAST_NAMES[(e * 7) % len(LAST_NAMES)]}"
        experts.append((expert_id, name, int(expert_topics[e]), epoch))
        truth.append((expert_id, float(quality[e])))
        n_services = int(rng.integers(1, 4))
        for kind in rng.choice(SERVICE_KINDS, size=n_services, replace=False):
            price = round(float(np.exp(rng.normal(np.log(60.0), 0.5))), 2)
            duration = int(rng.choice([30, 45, 60]))
            title = f"{TOPICS[expert_topics[e]].capitalize()}: {kind} with {name}"
            services.append((service_id, expert_id, int(expert_topics[e]), title, price,
                             duration, True, epoch))
            service_id += 1

    copy_rows(conn, "app.experts", ("expert_id", "name", "topic_id", "joined_at"), experts)
    copy_rows(conn, "app.services", ("service_id", "expert_id", "topic_id", "title", "price",
                                     "duration_minutes", "is_active", "created_at"), services)
    copy_rows(conn, "world.expert_truth", ("expert_id", "quality"), truth)

    users, user_truth = draw_users(rng, spec.users, 1, n_topics,
                                   spec.start_date - timedelta(days=30), spec.mean_budget_days)
    copy_rows(conn, "app.users", ("user_id", "signed_up_at", "signup_topics"), users)
    copy_rows(conn, "world.user_truth", TRUTH_COLUMNS, user_truth)
    conn.execute("insert into world.settings values ('spec', %s)", (spec.to_json(),))
    log.info("seeded world: %d topics, %d experts, %d services, %d users (seed %d)",
             n_topics, spec.experts, len(services), spec.users, spec.seed)


def world_spec(conn: psycopg.Connection) -> WorldSpec | None:
    """The spec of the world seeded in this database, or None."""
    exists = conn.execute("select to_regclass('world.settings')").fetchone()[0]
    if exists is None:
        return None
    row = conn.execute("select value from world.settings where key = 'spec'").fetchone()
    return None if row is None else WorldSpec.from_json(row[0])
