"""Batched simulation engine shared by the world, the fitted environment and presets.

Users are rows of tensors. One `SimEnv.step` is one day for every user of the batch: the
active users look at the slate they were shown, choose at most one service through a choice
model, maybe book it, and their interest state moves the way the nightly features move. With
an `ActivityModel`, a booking also changes how likely the user is to come back on later days
(better sessions, more visits), which is what makes a policy's choices matter beyond today.
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


class BookingModel(Protocol):
    """Anything that gives the probability that a click on a service becomes a booking."""

    def probability(
        self, state: UserState, items: Catalogue, clicked: torch.Tensor
    ) -> torch.Tensor:
        """Booking probability of each clicked service, (B,) or (B, K) like `clicked`."""
        ...


class BookingResponse:
    """Whether a click turns into a booking, and what the day is worth.

    The reward of a user-day is click_value * clicks + booking_value * item_value * bookings;
    with click_value 0, booking_value 1 and no item values it counts bookings.
    """

    def __init__(
        self,
        booking_rate: torch.Tensor,
        booking_value: float = 4.0,
        click_value: float = 1.0,
        booking_model: BookingModel | None = None,
        item_value: torch.Tensor | None = None,
    ) -> None:
        """Set up the response.

        Args:
            booking_rate: (S,) probability that a click on the service becomes a booking,
                used where no booking model is given.
            booking_value: reward of a booking, in units of a click.
            click_value: reward of a click.
            booking_model: a booking probability that depends on the user as well.
            item_value: (S,) multiplier of each service's booking reward (e.g. its price
                over the mean price); 1 when omitted.
        """
        self.booking_rate = booking_rate.float()
        self.booking_value = booking_value
        self.click_value = click_value
        self.booking_model = booking_model
        self.item_value = None if item_value is None else item_value.float()

    def booking_probability(
        self, clicked: torch.Tensor, state: UserState | None = None,
        items: Catalogue | None = None,
    ) -> torch.Tensor:
        """Probability that a click on each service of `clicked` ((B,) or (B, K)) books."""
        rows = clicked.clamp(min=0)
        if self.booking_model is not None and state is not None and items is not None:
            return self.booking_model.probability(state, items, rows)
        return self.booking_rate.to(rows.device)[rows]

    def booking_reward(self, clicked: torch.Tensor) -> torch.Tensor | float:
        """Reward of a booking of each service of `clicked` (any shape)."""
        if self.item_value is None:
            return self.booking_value
        return self.booking_value * self.item_value.to(clicked.device)[clicked.clamp(min=0)]

    def respond(
        self, clicked_items: torch.Tensor, generator: torch.Generator,
        state: UserState | None = None, items: Catalogue | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Draw bookings for the clicks of a day.

        Args:
            clicked_items: (B,) catalogue index of the clicked service, -1 where none.
            generator: the seeded source of randomness.
            state: the users, for a booking model that depends on them.
            items: the catalogue, likewise.

        Returns:
            clicks (B,), bookings (B,) as 0/1 floats, and reward (B,).
        """
        clicks = (clicked_items >= 0).float()
        rate = self.booking_probability(clicked_items, state, items) * clicks
        draws = torch.rand(rate.shape, generator=generator, device=rate.device)
        bookings = (draws < rate).float()
        reward = self.click_value * clicks + self.booking_reward(clicked_items) * bookings
        return clicks, bookings, reward

    def expected_reward(
        self, click_probability: torch.Tensor, slates: torch.Tensor,
        state: UserState | None = None, items: Catalogue | None = None,
    ) -> torch.Tensor:
        """(B,) expected reward of the day given each slate's (B, K) click probabilities."""
        booking = self.booking_probability(slates, state, items)
        per_item = self.click_value + self.booking_reward(slates) * booking
        return (click_probability * per_item).sum(dim=1)


class ActivityModel:
    """How a booking changes the user's chance to open the app on later days.

    A user's activity is the daily probability of a visit. A booking of service s adds
    `effect[s]` (negative for poor sessions) to it, kept within [floor, ceiling]; nothing
    else moves it. This is RecSim's time budget seen day by day: good sessions make the
    user come back more often, poor ones less.
    """

    def __init__(self, effect: torch.Tensor, floor: float = 0.01, ceiling: float = 0.99) -> None:
        """Set up the dynamics.

        Args:
            effect: (S,) change of daily visit probability after a booking of each service.
            floor: the lowest activity a user can fall to.
            ceiling: the highest activity.
        """
        self.effect = effect.float()
        self.floor = floor
        self.ceiling = ceiling

    def update(
        self, activity: torch.Tensor, clicked_items: torch.Tensor, bookings: torch.Tensor
    ) -> torch.Tensor:
        """(B,) activity after a day with these bookings (0/1) of these services."""
        change = self.effect.to(activity.device)[clicked_items.clamp(min=0)] * bookings
        # Limitation: activity only moves with bookings; users never drift away on their own,
        # so the environment has no churn that a policy could slow down without bookings.
        return (activity + change).clamp(self.floor, self.ceiling)


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
        activity_model: ActivityModel | None = None,
    ) -> None:
        """Assemble the environment from its parts.

        Args:
            population: (U rows) the users episodes start from.
            catalogue: the services slates are made of.
            choice_model: the users' click behaviour (utilities against a no-click of 0).
            response: bookings and reward.
            user_model: interest dynamics; 14-day half-life when omitted.
            horizon: days per episode.
            p_active: probability that a user opens the app on a day, scalar or (U,): the
                users' activity on day 0.
            seed: seed of the environment's generator.
            activity_model: how bookings change each user's activity during an episode;
                activity stays at `p_active` when omitted.
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
        self.activity_model = activity_model
        self.state: UserState | None = None
        self.day = 0
        self.activity = self.p_active
        """(B,) (or scalar) daily visit probability of the episode's users."""

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
        activity = self.p_active[users] if self.p_active.dim() else self.p_active
        self.activity = activity.expand(len(users)).clone()
        self.day = 0
        self.state = replace(state, active=self._draw_active(state.n_users))
        return self.state

    def step(self, slates: torch.Tensor) -> tuple[UserState, torch.Tensor, dict[str, torch.Tensor]]:
        """Show each user a slate for one day.

        Args:
            slates: (B, K) long catalogue indices, row b for user b of the current state.

        Returns:
            The next state, reward (B,), and info with `clicks`, `bookings` (B,) 0/1 floats,
            `choice` (B,) slate position clicked or -1, `active` (B,) bool of the day,
            `expected_reward` (B,) the reward's expectation given the state and slate (0 for
            inactive users), and `activity` (B,) the users' visit probability afterwards.
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
        clicks, bookings, reward = self.response.respond(
            clicked_items, self.generator, state, self.catalogue)
        with torch.no_grad():
            no_click = utilities.new_zeros(utilities.shape[0], 1)
            click_probability = torch.softmax(torch.cat([utilities, no_click], 1), 1)[:, :-1]
            expected = self.response.expected_reward(
                click_probability, slates, state, self.catalogue) * state.active

        topic = self.catalogue.topic[clicked_items.clamp(min=0)]
        next_state = self.user_model.update(state, topic, clicks, bookings)
        if self.activity_model is not None:
            self.activity = self.activity_model.update(self.activity, clicked_items, bookings)
        self.day += 1
        self.state = replace(next_state, active=self._draw_active(state.n_users))
        info = {"clicks": clicks, "bookings": bookings, "choice": choice, "active": state.active,
                "expected_reward": expected, "activity": self.activity}
        return self.state, reward, info

    def _draw_active(self, n: int) -> torch.Tensor:
        draws = torch.rand(n, generator=self.generator, device=self.device)
        return draws < self.activity
