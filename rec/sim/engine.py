"""Batched simulation engine shared by the world, the fitted environment and presets.

Users are rows of tensors. One `SimEnv.step` is one day for every user of the batch: the
active users look at the slate they were shown, choose at most one service through a choice
model, maybe book it, and their interest state moves the way the nightly features move.
The choice sampler and the small interfaces here (item sampler, choice model) also serve the
presets, such as `rec.sim.recsim`, whose users and responses follow other rules.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Protocol

import torch

logger = logging.getLogger(__name__)

CLICK_WEIGHT = 1.0
"""Weight a click adds to the user's decayed interaction weight of the clicked topic."""
BOOKING_WEIGHT = 4.0
"""Weight a booking adds, as the nightly interest features count it."""


def sample_slate_choice(
    utilities: torch.Tensor, no_click_utility: torch.Tensor | float, generator: torch.Generator
) -> torch.Tensor:
    """Draw at most one choice per slate from a multinomial logit.

    Args:
        utilities: (B, K) utility of each slate item for each user.
        no_click_utility: utility of choosing nothing, (B,) or a scalar.
        generator: the seeded source of randomness.

    Returns:
        (B,) index of the chosen item in 0..K-1, or -1 where the user chose nothing.
    """
    batch = utilities.shape[0]
    no_click = torch.as_tensor(
        no_click_utility, dtype=utilities.dtype, device=utilities.device
    ).expand(batch)
    logits = torch.cat([utilities, no_click.unsqueeze(1)], dim=1)
    return sample_from_weights(torch.softmax(logits, dim=1), generator)


def sample_from_weights(weights: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Draw one option per row with probability proportional to its weight.

    The last column is the no-click option. One uniform per row is compared with the running
    sum of the weights (inverse CDF), which is cheaper than `torch.multinomial` for the few
    options of a slate.

    Args:
        weights: (B, K + 1) non-negative weights; column K is the no-click option.
        generator: the seeded source of randomness.

    Returns:
        (B,) index of the chosen item in 0..K-1, or -1 where the no-click option was drawn.
    """
    cumulative = weights.cumsum(dim=1)
    draws = torch.rand(
        weights.shape[0], generator=generator, device=weights.device, dtype=weights.dtype
    )
    threshold = (draws * cumulative[:, -1]).unsqueeze(1)
    choice = (cumulative[:, :-1] <= threshold).sum(dim=1)
    return torch.where(choice == weights.shape[1] - 1, -1, choice)


@dataclass
class UserState:
    """The state of a batch of users, as the nightly features describe it."""

    interest: torch.Tensor
    """(U, T) share of the user's decayed interactions per topic; all-zero without history."""
    strength: torch.Tensor
    """(U,) log1p of the user's total decayed interaction weight."""
    signup: torch.Tensor
    """(U, T) 1 for the topics the user picked at sign-up, else 0."""
    active: torch.Tensor
    """(U,) bool: the user opens the app today and sees the slate."""

    @classmethod
    def from_features(
        cls, interest: torch.Tensor, strength: torch.Tensor, signup: torch.Tensor
    ) -> UserState:
        """Build a state of users that are all active, from the feature tensors."""
        active = torch.ones(interest.shape[0], dtype=torch.bool, device=interest.device)
        return cls(interest.float(), strength.float(), signup.float(), active)

    @property
    def n_users(self) -> int:
        return self.interest.shape[0]

    @property
    def n_topics(self) -> int:
        return self.interest.shape[1]

    @property
    def device(self) -> torch.device:
        return self.interest.device

    def index(self, rows: torch.Tensor) -> UserState:
        """The users at `rows` (a LongTensor or a bool mask), as a new state."""
        return UserState(
            self.interest[rows], self.strength[rows], self.signup[rows], self.active[rows]
        )

    def decayed_weights(self) -> torch.Tensor:
        """(U, T) decayed interaction weight per topic, recovered from shares and strength."""
        return self.interest * torch.expm1(self.strength).unsqueeze(1)


@dataclass
class Catalogue:
    """The services that can be recommended."""

    topic: torch.Tensor
    """(S,) long topic of each service."""
    numeric: torch.Tensor
    """(S, F) standardised numeric features (log price, smoothed CTR, smoothed rating, ...)."""
    expert: torch.Tensor | None = None
    """(S,) long id of each service's expert, for choice models with expert effects."""

    @property
    def n_items(self) -> int:
        return self.topic.shape[0]


class SlateChoiceModel(Protocol):
    """Anything that scores slate items for users; the no-click option has utility 0."""

    def utilities(
        self,
        state: UserState,
        items: Catalogue,
        slates: torch.Tensor,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, K) utility of each item of each slate (positions default to 0..K-1)."""
        ...


class ItemSampler(Protocol):
    """Draws the candidate items each user can be shown at a step."""

    def sample(self, n_users: int, generator: torch.Generator) -> torch.Tensor:
        """(n_users, C) long ids of each user's candidates (catalogue rows or cluster ids)."""
        ...


class ProbabilityChoiceModel(Protocol):
    """Turns slate scores into choice weights; the last column is the no-click option."""

    def weights(self, scores: torch.Tensor) -> torch.Tensor:
        """(B, K + 1) non-negative weights from (B, K) scores, for `sample_from_weights`."""
        ...


class InterestUserModel:
    """Interest dynamics: decayed interaction weights per topic, renormalised to shares."""

    def __init__(
        self,
        half_life_days: float = 14.0,
        click_weight: float = CLICK_WEIGHT,
        booking_weight: float = BOOKING_WEIGHT,
    ) -> None:
        """Set up the dynamics.

        Args:
            half_life_days: days after which an interaction counts half.
            click_weight: weight added to the clicked topic by a click.
            booking_weight: weight added to the clicked topic by a booking.
        """
        self.decay = 0.5 ** (1.0 / half_life_days)
        self.click_weight = click_weight
        self.booking_weight = booking_weight

    def update(
        self, state: UserState, topic: torch.Tensor, clicks: torch.Tensor, bookings: torch.Tensor
    ) -> UserState:
        """Advance every user by one day.

        Args:
            state: the users before the day.
            topic: (B,) long topic of the clicked service (any value where nothing was clicked).
            clicks: (B,) 1 where the user clicked, else 0.
            bookings: (B,) 1 where the user booked, else 0.

        Returns:
            The users after the day; `active` is left for the environment to redraw.
        """
        weights = state.decayed_weights() * self.decay
        added = self.click_weight * clicks + self.booking_weight * bookings
        weights = weights.scatter_add(1, topic.clamp(min=0).unsqueeze(1), added.unsqueeze(1))
        total = weights.sum(dim=1)
        interest = torch.where(
            total.unsqueeze(1) > 0, weights / total.clamp(min=1e-12).unsqueeze(1), 0.0
        )
        return replace(state, interest=interest, strength=torch.log1p(total))


class BookingResponse:
    """Whether a click turns into a booking, and what the day is worth."""

    def __init__(self, booking_rate: torch.Tensor, booking_value: float = 4.0) -> None:
        """Set up the response.

        Args:
            booking_rate: (S,) probability that a click on the service becomes a booking.
            booking_value: reward of a booking, in units of a click.
        """
        self.booking_rate = booking_rate.float()
        self.booking_value = booking_value

    def respond(
        self, clicked_items: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Draw bookings for the clicks of a day.

        Args:
            clicked_items: (B,) catalogue index of the clicked service, -1 where none.
            generator: the seeded source of randomness.

        Returns:
            clicks (B,), bookings (B,) as 0/1 floats, and reward (B,).
        """
        clicks = (clicked_items >= 0).float()
        rate = self.booking_rate[clicked_items.clamp(min=0)] * clicks
        draws = torch.rand(rate.shape, generator=generator, device=rate.device)
        bookings = (draws < rate).float()
        return clicks, bookings, clicks + self.booking_value * bookings


class SimEnv:
    """A batched environment: `reset` picks users, `step` plays one day of slates."""

    def __init__(
        self,
        population: UserState,
        catalogue: Catalogue,
        choice_model: SlateChoiceModel,
        response: BookingResponse,
        user_model: InterestUserModel | None = None,
        horizon: int = 8,
        p_active: float | torch.Tensor = 1.0,
        seed: int = 0,
    ) -> None:
        """Assemble the environment from its parts.

        Args:
            population: (U rows) the users episodes start from.
            catalogue: the services slates are made of.
            choice_model: the users' click behaviour (utilities against a no-click of 0).
            response: bookings and reward.
            user_model: interest dynamics; 14-day half-life when omitted.
            horizon: days per episode.
            p_active: probability that a user opens the app on a day, scalar or (U,).
            seed: seed of the environment's generator.
        """
        self.population = population
        self.catalogue = catalogue
        self.choice_model = choice_model
        self.response = response
        response.booking_rate = response.booking_rate.to(population.device)
        self.user_model = user_model or InterestUserModel()
        self.horizon = horizon
        self.device = population.device
        self.p_active = torch.as_tensor(p_active, dtype=torch.float32, device=self.device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        self.state: UserState | None = None
        self.day = 0
        self._p_active_batch = self.p_active

    @property
    def done(self) -> bool:
        return self.day >= self.horizon

    def seed(self, seed: int) -> None:
        """Restart the environment's randomness."""
        self.generator.manual_seed(seed)

    def sample_users(self, n: int) -> torch.Tensor:
        """(n,) population rows drawn uniformly with replacement from the env's generator."""
        return torch.randint(
            self.population.n_users, (n,), generator=self.generator, device=self.device
        )

    def reset(self, users: torch.Tensor | None = None) -> UserState:
        """Start an episode for the population rows `users` (all rows when None).

        Returns:
            The users' state on day 0, with today's active mask drawn.
        """
        if users is None:
            users = torch.arange(self.population.n_users, device=self.device)
        state = self.population.index(users)
        self._p_active_batch = self.p_active[users] if self.p_active.dim() else self.p_active
        self.day = 0
        self.state = replace(state, active=self._draw_active(state.n_users))
        return self.state

    def step(self, slates: torch.Tensor) -> tuple[UserState, torch.Tensor, dict[str, torch.Tensor]]:
        """Show each user a slate for one day.

        Args:
            slates: (B, K) long catalogue indices, row b for user b of the current state.

        Returns:
            The next state, reward (B,), and info with `clicks`, `bookings` (B,) 0/1 floats,
            `choice` (B,) slate position clicked or -1, and `active` (B,) bool of the day.
        """
        if self.state is None or self.done:
            raise RuntimeError("call reset() before step() and after an episode ends")
        state = self.state
        with torch.no_grad():
            utilities = self.choice_model.utilities(state, self.catalogue, slates)
        # Limitation: at most one click per user and day; logged days with several clicks
        # are fitted as several choices but never simulated as such.
        choice = sample_slate_choice(utilities, 0.0, self.generator)
        choice = torch.where(state.active, choice, torch.full_like(choice, -1))
        clicked_items = torch.where(
            choice >= 0, slates.gather(1, choice.clamp(min=0).unsqueeze(1)).squeeze(1), -1
        )
        clicks, bookings, reward = self.response.respond(clicked_items, self.generator)

        topic = self.catalogue.topic[clicked_items.clamp(min=0)]
        next_state = self.user_model.update(state, topic, clicks, bookings)
        self.day += 1
        self.state = replace(next_state, active=self._draw_active(state.n_users))
        info = {"clicks": clicks, "bookings": bookings, "choice": choice, "active": state.active}
        return self.state, reward, info

    def _draw_active(self, n: int) -> torch.Tensor:
        draws = torch.rand(n, generator=self.generator, device=self.device)
        return draws < self._p_active_batch
