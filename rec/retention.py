"""What the logs say about the long term: who books, and who comes back afterwards.

Three estimates feed the fitted training environment (`rec.sim.engine`):

- `BookingModel`: the probability that a click becomes a booking, from the user's interest in
  the service's topic, the service's features and a per-expert effect shrunk to the mean.
- `estimate_activity`: each user's daily visit probability, shrunk to the population's.
- `estimate_retention`: how a booking with an expert changes the user's daily visit
  probability afterwards. Every visit is compared with itself: the visit rate in the
  `window` days after it minus the rate in the `window` days before it. Visits without a
  booking give the change that happens anyway (trends, churn); a booking's effect is its
  change beyond that. The effect is regressed on the expert's satisfaction (the shrunk mean
  rating of the expert's sessions), and what each expert keeps of its own residual is
  shrunk by an empirical-Bayes factor, so a rarely booked expert sits near the regression.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rec.sim.engine import Catalogue, UserState

logger = logging.getLogger(__name__)


class BookingModel(nn.Module):
    """Logistic P(booking | click): interest, sign-up, service features and expert effects.

    logit = intercept + a * interest_u[topic] + b * signup_u[topic] + theta' numeric_s
        + expert_effect[expert_s], with expert effects for the ids seen in the fit (0, the
    mean of the shrunk effects, for the others).
    """

    def __init__(self, numeric_columns: list[int], n_experts: int = 0) -> None:
        """Create a model with every coefficient at zero.

        Args:
            numeric_columns: the columns of the services' numeric features it uses.
            n_experts: E, experts with an effect of their own.
        """
        super().__init__()
        self.config = {"numeric_columns": list(numeric_columns), "n_experts": n_experts}
        self.intercept = nn.Parameter(torch.zeros(()))
        self.interest_coef = nn.Parameter(torch.zeros(()))
        self.signup_coef = nn.Parameter(torch.zeros(()))
        self.numeric_coef = nn.Parameter(torch.zeros(len(numeric_columns)))
        self.expert_effect = nn.Parameter(torch.zeros(n_experts))
        self.register_buffer("expert_ids", torch.arange(n_experts))

    def expert_effects(self, expert: torch.Tensor | None) -> torch.Tensor | float:
        """Effect of each expert id in `expert` (any shape); 0 for ids unseen in the fit."""
        if expert is None or self.config["n_experts"] == 0:
            return 0.0
        expert = expert.long()
        row = torch.searchsorted(self.expert_ids, expert).clamp(max=self.expert_ids.shape[0] - 1)
        return torch.where(self.expert_ids[row] == expert, self.expert_effect[row], 0.0)

    def logits(self, interest: torch.Tensor, signup: torch.Tensor, topic: torch.Tensor,
               numeric: torch.Tensor, expert: torch.Tensor | None) -> torch.Tensor:
        """Booking logits of services (topic, numeric (.., F), expert of shape (..)) for users
        whose interest and sign-up values in those services' topics are given (same shape)."""
        logit = self.intercept + self.interest_coef * interest + self.signup_coef * signup
        used = numeric[..., self.config["numeric_columns"]]
        return logit + used @ self.numeric_coef + self.expert_effects(expert)

    def probability(self, state: UserState, items: Catalogue,
                    clicked: torch.Tensor) -> torch.Tensor:
        """Booking probability of each clicked service, (B,) or (B, K) like `clicked`."""
        rows = clicked.clamp(min=0)
        topic = items.topic[rows]
        flat_topic = topic if topic.dim() == 2 else topic.unsqueeze(1)
        interest = state.interest.gather(1, flat_topic).view(topic.shape)
        signup = state.signup.gather(1, flat_topic).view(topic.shape)
        expert = None if items.expert is None else items.expert[rows]
        with torch.no_grad():
            return torch.sigmoid(self.logits(interest, signup, topic, items.numeric[rows],
                                             expert))


def fit_booking_model(interest: torch.Tensor, signup: torch.Tensor, numeric: torch.Tensor,
                      expert: torch.Tensor, booked: torch.Tensor,
                      numeric_columns: tuple[int, ...] = (0,), prior_sd: float = 0.5,
                      coef_prior_sd: float = 2.0, max_iter: int = 100,
                      ) -> tuple[BookingModel, dict]:
    """Fit `BookingModel` on clicks by penalised maximum likelihood (full-batch L-BFGS).

    Args:
        interest: (N,) the clicking user's interest share in the service's topic.
        signup: (N,) 1 where the user picked that topic at sign-up.
        numeric: (N, F) the clicked service's numeric features.
        expert: (N,) long expert id of the clicked service.
        booked: (N,) 0/1 whether the click became a booking.
        numeric_columns: the numeric features the model uses. The default, log price
            alone, leaves out the counts (bookings, CTR, ratings) that already contain the
            outcomes being fitted; the expert effects carry what those would say.
        prior_sd: standard deviation of the Gaussian prior shrinking each expert's effect to 0.
        coef_prior_sd: that of the prior on the other coefficients (not the intercept).
        max_iter: L-BFGS iterations.

    Returns:
        The fitted model (float32) and metrics: `clicks`, `booking_rate`, `logloss`,
        `coefficients` and `expert_effect_sd`.
    """
    expert_ids, expert_row = torch.unique(expert.long(), return_inverse=True)
    model = BookingModel(list(numeric_columns), len(expert_ids)).double()
    model.expert_ids.copy_(expert_ids)
    x = [t.double() for t in (interest, signup, numeric[:, list(numeric_columns)], booked)]
    n = max(len(booked), 1)
    optimizer = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=max_iter,
                                  line_search_fn="strong_wolfe")

    def loss_of() -> torch.Tensor:
        logit = (model.intercept + model.interest_coef * x[0] + model.signup_coef * x[1]
                 + x[2] @ model.numeric_coef + model.expert_effect[expert_row])
        nll = nn.functional.binary_cross_entropy_with_logits(logit, x[3], reduction="sum") / n
        penalty = (model.interest_coef.square() + model.signup_coef.square()
                   + model.numeric_coef.square().sum()) / (2.0 * coef_prior_sd**2 * n)
        prior = model.expert_effect.square().sum() / (2.0 * prior_sd**2 * n)
        return nll + penalty + prior

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = loss_of()
        loss.backward()
        return loss

    if len(booked):
        optimizer.step(closure)
    with torch.no_grad():
        loss = float(loss_of())
    model = model.float().eval().requires_grad_(False)
    metrics = {
        "clicks": len(booked),
        "booking_rate": float(booked.float().mean()) if len(booked) else float("nan"),
        "logloss": loss,
        "coefficients": {"intercept": float(model.intercept), "interest":
                         float(model.interest_coef), "signup": float(model.signup_coef),
                         "numeric": model.numeric_coef.tolist()},
        "expert_effect_sd": float(model.expert_effect.std()) if len(expert_ids) > 1 else 0.0,
    }
    logger.info("booking model on %d clicks: rate %.3f, interest coef %.2f, expert sd %.2f",
                metrics["clicks"], metrics["booking_rate"], metrics["coefficients"]["interest"],
                metrics["expert_effect_sd"])
    return model, metrics


@dataclass
class VisitLog:
    """Who visited on which day of a window, and who booked whom; days are 0..n_days-1."""

    n_days: int
    first_day: np.ndarray
    """(U,) the first day each user could visit (0 when they signed up before the window)."""
    visit_user: np.ndarray
    """(V,) user row of each visit (a user-day with at least one slate)."""
    visit_day: np.ndarray
    booking_user: np.ndarray
    """(B,) user row of each booking."""
    booking_day: np.ndarray
    booking_expert: np.ndarray
    """(B,) expert id of each booking."""

    @property
    def n_users(self) -> int:
        return len(self.first_day)

    def matrices(self) -> tuple[np.ndarray, np.ndarray]:
        """(U, D) visits (0/1) and observed days (0/1: on or after the user's first day)."""
        visits = np.zeros((self.n_users, self.n_days))
        visits[self.visit_user, self.visit_day] = 1.0
        observed = (np.arange(self.n_days)[None, :] >= self.first_day[:, None]).astype(float)
        return visits * observed, observed


def estimate_activity(log: VisitLog, recent_days: int = 14,
                      prior_days: float = 7.0) -> tuple[np.ndarray, float]:
    """Each user's daily visit probability over the last `recent_days` observed days.

    Visits over observed days, shrunk towards the pooled rate as if `prior_days` days at that
    rate had been seen too; a user with no observed day gets the pooled rate.

    Returns:
        (U,) activity in (0, 1), and the pooled rate.
    """
    visits, observed = log.matrices()
    start = max(log.n_days - recent_days, 0)
    seen = visits[:, start:].sum(1)
    days = observed[:, start:].sum(1)
    pooled = float(seen.sum() / max(days.sum(), 1.0))
    return (seen + prior_days * pooled) / (days + prior_days), pooled


@dataclass
class RetentionEffects:
    """Change of daily visit probability after a booking, per expert."""

    expert_ids: np.ndarray
    effect: np.ndarray
    """(E,) effect of a booking with each expert, in visit probability per day."""
    booking_effect: float = 0.0
    """The effect of a booking with an expert of average satisfaction."""
    satisfaction_slope: float = 0.0
    """Extra effect per rating point of the expert's shrunk mean rating above the mean."""
    baseline_change: float = 0.0
    """Change of visit rate around a visit without a booking (the trend)."""
    metrics: dict[str, Any] = field(default_factory=dict)

    def of(self, experts: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Effect for each expert id; an expert unseen in the fit gets `booking_effect`."""
        experts = np.asarray(experts, dtype=np.int64)
        effect = np.full(len(experts), self.booking_effect, dtype=np.float64)
        if len(self.expert_ids):
            row = np.searchsorted(self.expert_ids, experts).clip(max=len(self.expert_ids) - 1)
            known = self.expert_ids[row] == experts
            effect[known] = self.effect[row[known]]
        return torch.tensor(effect, dtype=torch.float32)

    def to_dict(self) -> dict[str, Any]:
        return {"expert_ids": self.expert_ids.tolist(), "effect": self.effect.tolist(),
                "booking_effect": self.booking_effect,
                "satisfaction_slope": self.satisfaction_slope,
                "baseline_change": self.baseline_change, "metrics": self.metrics}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RetentionEffects:
        return cls(np.asarray(values["expert_ids"], dtype=np.int64),
                   np.asarray(values["effect"], dtype=np.float64), values["booking_effect"],
                   values["satisfaction_slope"], values["baseline_change"],
                   dict(values.get("metrics", {})))


def expert_satisfaction(expert: np.ndarray, rating_sum: np.ndarray, n_reviews: np.ndarray,
                        prior_reviews: float = 5.0) -> tuple[np.ndarray, np.ndarray]:
    """Each expert's mean rating shrunk to the overall mean, minus that mean.

    Args:
        expert: (R,) expert id of each row (a review, or a service with its totals).
        rating_sum: (R,) sum of the row's ratings.
        n_reviews: (R,) number of ratings in the row.
        prior_reviews: reviews at the overall mean added to every expert.

    Returns:
        (E,) the distinct expert ids (sorted) and (E,) their centred shrunk mean ratings
        (all 0 without any review).
    """
    ids, row = np.unique(np.asarray(expert, dtype=np.int64), return_inverse=True)
    total = np.bincount(row, weights=np.asarray(rating_sum, float), minlength=len(ids))
    count = np.bincount(row, weights=np.asarray(n_reviews, float), minlength=len(ids))
    if count.sum() == 0:
        return ids, np.zeros(len(ids))
    mean = float(total.sum() / count.sum())
    return ids, (total + prior_reviews * mean) / (count + prior_reviews) - mean


def _window_rates(visits: np.ndarray, observed: np.ndarray, user: np.ndarray, day: np.ndarray,
                  window: int) -> tuple[np.ndarray, ...]:
    """Visits and observed days in the `window` days before and after each (user, day)."""
    n_days = visits.shape[1]
    zero = np.zeros((visits.shape[0], 1))
    cum_v = np.concatenate([zero, visits.cumsum(1)], 1)
    cum_o = np.concatenate([zero, observed.cumsum(1)], 1)
    before = np.maximum(day - window, 0)
    after = np.minimum(day + 1 + window, n_days)
    pre_v = cum_v[user, day] - cum_v[user, before]
    pre_o = cum_o[user, day] - cum_o[user, before]
    post_v = cum_v[user, after] - cum_v[user, day + 1]
    post_o = cum_o[user, after] - cum_o[user, day + 1]
    return pre_v, pre_o, post_v, post_o


def estimate_retention(log: VisitLog, satisfaction_ids: np.ndarray | None = None,
                       satisfaction: np.ndarray | None = None, window: int = 7,
                       min_days: int = 2) -> RetentionEffects:
    """The change of a user's daily visit probability caused by a booking, per expert.

    For every visit with at least `min_days` observed days on both sides, the change is the
    visit rate over the `window` days after minus the rate over the `window` days before.
    Visits without a booking give the baseline change; for the day's bookings the excess
    over it is regressed (weighted least squares, weights the inverse of the two rates'
    sampling variance up to a constant) on the expert's satisfaction:
    excess = booking_effect + satisfaction_slope * satisfaction + expert residual, and each
    expert's mean residual is shrunk by tau^2 / (tau^2 + its sampling variance).

    Args:
        log: visits and bookings of the window.
        satisfaction_ids: (E,) sorted expert ids with a satisfaction score.
        satisfaction: (E,) their centred shrunk mean ratings (`expert_satisfaction`);
            0 for experts without one.
        window: days on each side of a visit.
        min_days: observed days needed on each side.

    Returns:
        The effects of every booked expert and of every expert with a satisfaction score.
    """
    visits, observed = log.matrices()
    user, day = log.visit_user, log.visit_day
    pre_v, pre_o, post_v, post_o = _window_rates(visits, observed, user, day, window)
    usable = (pre_o >= min_days) & (post_o >= min_days)
    change = np.where(usable, post_v / np.maximum(post_o, 1) - pre_v / np.maximum(pre_o, 1), 0)
    weight = np.where(usable, 1.0 / (1.0 / np.maximum(pre_o, 1) + 1.0 / np.maximum(post_o, 1)),
                      0.0)

    key = user.astype(np.int64) * log.n_days + day
    is_booking_day = np.isin(key, log.booking_user.astype(np.int64) * log.n_days
                             + log.booking_day)
    control = usable & ~is_booking_day
    baseline = float(np.average(change[control], weights=weight[control])) if control.any() \
        else 0.0

    b_pre_v, b_pre_o, b_post_v, b_post_o = _window_rates(
        visits, observed, log.booking_user, log.booking_day, window)
    keep = (b_pre_o >= min_days) & (b_post_o >= min_days)
    excess = (b_post_v / np.maximum(b_post_o, 1) - b_pre_v / np.maximum(b_pre_o, 1))[keep]
    excess = excess - baseline
    b_weight = (1.0 / (1.0 / np.maximum(b_pre_o, 1) + 1.0 / np.maximum(b_post_o, 1)))[keep]
    experts = log.booking_expert[keep].astype(np.int64)

    sat_ids = np.zeros(0, np.int64) if satisfaction_ids is None else np.asarray(
        satisfaction_ids, np.int64)
    sat = np.zeros(0) if satisfaction is None else np.asarray(satisfaction, float)

    def satisfaction_of(ids: np.ndarray) -> np.ndarray:
        if len(sat_ids) == 0:
            return np.zeros(len(ids))
        row = np.searchsorted(sat_ids, ids).clip(max=len(sat_ids) - 1)
        return np.where(sat_ids[row] == ids, sat[row], 0.0)

    all_ids = np.union1d(np.unique(log.booking_expert.astype(np.int64)), sat_ids)
    metrics: dict[str, Any] = {"visits_used": int(usable.sum()), "bookings_used": int(keep.sum()),
                               "window": window}
    if keep.sum() < 3:
        logger.warning("only %d usable bookings: no retention effect estimated", keep.sum())
        return RetentionEffects(all_ids, np.zeros(len(all_ids)), 0.0, 0.0, baseline, metrics)

    s = satisfaction_of(experts)
    design = np.stack([np.ones_like(s), s], 1)
    vary = np.ptp(s) > 1e-9
    if not vary:
        design = design[:, :1]
    sqrt_w = np.sqrt(b_weight)
    coef, *_ = np.linalg.lstsq(design * sqrt_w[:, None], excess * sqrt_w, rcond=None)
    booking_effect, slope = float(coef[0]), float(coef[1]) if vary else 0.0
    residual = excess - design @ coef
    sigma2 = float(np.average(residual**2, weights=b_weight)) * len(residual) / max(
        len(residual) - design.shape[1], 1)
    bread = np.linalg.pinv((design * b_weight[:, None]).T @ design)
    se = np.sqrt(np.diag(bread) * sigma2)

    # Empirical Bayes: per-expert mean residual, its sampling variance, the spread between
    # experts beyond that variance (tau^2), and the share of its own residual each keeps.
    ids, row = np.unique(experts, return_inverse=True)
    w_sum = np.bincount(row, weights=b_weight, minlength=len(ids))
    mean_residual = np.bincount(row, weights=b_weight * residual, minlength=len(ids)) / w_sum
    sampling_var = sigma2 / w_sum
    tau2 = max(float(np.mean(mean_residual**2 - sampling_var)), 0.0)
    shrunk = mean_residual * tau2 / (tau2 + sampling_var)

    effect = booking_effect + slope * satisfaction_of(all_ids)
    effect[np.searchsorted(all_ids, ids)] += shrunk
    metrics.update({"booking_effect_se": float(se[0]),
                    "satisfaction_slope_se": float(se[1]) if vary else None,
                    "expert_tau": float(np.sqrt(tau2)), "residual_sd": float(np.sqrt(sigma2))})
    logger.info("retention: a booking changes daily visits by %.4f (se %.4f) + %.4f (se %s) per"
                " rating point; baseline change %.4f; %d bookings, %d visits", booking_effect,
                se[0], slope, f"{se[1]:.4f}" if vary else "-", baseline, keep.sum(),
                usable.sum())
    return RetentionEffects(all_ids, effect, booking_effect, slope, baseline, metrics)


@dataclass
class FittedDynamics:
    """The long-term part of the fitted environment, as one file next to the choice model."""

    booking: BookingModel
    retention: RetentionEffects
    user_ids: np.ndarray
    """(U,) users with an activity estimate (sorted)."""
    activity: np.ndarray
    """(U,) their daily visit probability."""
    pooled_activity: float
    """The activity of a user without an estimate."""
    metrics: dict[str, Any] = field(default_factory=dict)

    def activity_of(self, user_ids: np.ndarray) -> torch.Tensor:
        """Activity of each user id; `pooled_activity` for users without an estimate."""
        user_ids = np.asarray(user_ids, dtype=np.int64)
        out = np.full(len(user_ids), self.pooled_activity)
        if len(self.user_ids):
            row = np.searchsorted(self.user_ids, user_ids).clip(max=len(self.user_ids) - 1)
            known = self.user_ids[row] == user_ids
            out[known] = self.activity[row[known]]
        return torch.tensor(out, dtype=torch.float32)

    def save(self, path: str | Path, metadata: dict[str, Any] | None = None) -> None:
        payload = {
            "booking_config": dict(self.booking.config),
            "booking_state": {k: v.detach().cpu() for k, v in self.booking.state_dict().items()},
            "retention": self.retention.to_dict(),
            "user_ids": torch.as_tensor(self.user_ids, dtype=torch.long),
            "activity": torch.as_tensor(self.activity, dtype=torch.float64),
            "pooled_activity": float(self.pooled_activity),
            "metrics": self.metrics,
            "metadata": metadata or {},
        }
        torch.save(payload, Path(path))

    @classmethod
    def load(cls, path: str | Path) -> FittedDynamics:
        payload = torch.load(Path(path), map_location="cpu", weights_only=True)
        booking = BookingModel(**payload["booking_config"])
        booking.load_state_dict(payload["booking_state"])
        return cls(booking.eval(), RetentionEffects.from_dict(payload["retention"]),
                   payload["user_ids"].numpy(), payload["activity"].numpy(),
                   payload["pooled_activity"], payload.get("metrics", {}))
