"""Where the project keeps its state and which knobs a nightly run reads.

Everything is taken from the environment so that the same code runs from the
command line, from Airflow workers and from docker-compose.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def rec_home() -> Path:
    """The folder holding the embedded database, Airflow's home and model artifacts."""
    home = Path(os.environ.get("REC_HOME", REPO_ROOT / ".rec")).expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    return home


def airflow_home() -> Path:
    return Path(os.environ.get("AIRFLOW_HOME", rec_home() / "airflow"))


def artifacts_dir() -> Path:
    path = rec_home() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


ARMS = ("rl", "myopic", "popularity")
"""The policies a nightly run can publish (`RunConfig.arm`)."""
REWARDS = ("bookings", "revenue")
"""What the agent can be trained to maximise (`RunConfig.reward`)."""


@dataclass(frozen=True)
class RunConfig:
    """Knobs of one nightly run; Airflow params override them per run."""

    top_n: int = 20
    """How many services each user's published list holds."""
    exploration: float = 0.1
    """Share of list slots filled by sampling from the policy instead of its argmax."""
    history_days: int = 28
    """How many days of logged slates the choice model is fitted on."""
    agent_steps: int = 60
    """REINFORCE updates per night, fine-tuning the night's start policy (the distilled
    lookahead, warm-started from the champion)."""
    horizon: int = 8
    """Simulated days per training episode: the agent optimises this many days ahead."""
    keep_runs: int = 30
    """Run dates whose published lists stay queryable; older partitions are dropped."""
    users_per_shard: int = 250_000
    """Users scored by one mapped Airflow task (one shard) when publishing."""
    seed: int = 0
    """Seed of every random draw in fitting, training and publishing."""
    arm: str = "rl"
    """What gets published: `rl` (the gated RL agent), or a control arm that skips agent
    training: `myopic` (the fitted choice model's click ranking) or `popularity` (services
    by bookings)."""
    reward: str = "bookings"
    """What the agent maximises in the simulator: `bookings` (each booking counts 1) or
    `revenue` (each booking counts its price over the catalogue's mean price)."""

    def __post_init__(self) -> None:
        if self.arm not in ARMS:
            raise ValueError(f"unknown arm {self.arm!r}: expected one of {', '.join(ARMS)}")
        if self.reward not in REWARDS:
            raise ValueError(f"unknown reward {self.reward!r}: expected one of "
                             f"{', '.join(REWARDS)}")

    @classmethod
    def from_env(cls, **overrides) -> RunConfig:
        env = {
            "top_n": os.environ.get("REC_TOP_N"),
            "exploration": os.environ.get("REC_EXPLORATION"),
            "agent_steps": os.environ.get("REC_AGENT_STEPS"),
            "keep_runs": os.environ.get("REC_KEEP_RUNS"),
            "users_per_shard": os.environ.get("REC_USERS_PER_SHARD"),
            "arm": os.environ.get("REC_ARM"),
            "reward": os.environ.get("REC_REWARD"),
        }
        values = {k: type(getattr(cls, k))(v) for k, v in env.items() if v is not None}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
