"""The user choice model: a conditional logit over a slate plus a no-click option.

It is fitted every night on logged slates and then drives the training simulator, so its
utilities use only what the nightly features know about users and services.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rec.sim.engine import Catalogue, UserState

logger = logging.getLogger(__name__)


@dataclass
class ChoiceData:
    """Logged slates for fitting, one row per impression, with point-in-time user states."""

    interest: torch.Tensor
    """(U, T) interest shares of each user state the impressions point at."""
    strength: torch.Tensor
    """(U,) log1p of the total decayed interaction weight of each user state."""
    signup: torch.Tensor
    """(U, T) 0/1 sign-up topics of each user state."""
    topic: torch.Tensor
    """(S,) long topic of each service."""
    item_numeric: torch.Tensor
    """(S, F) standardised numeric features of each service."""
    slate: torch.Tensor
    """(N,) long id of the slate the impression belongs to (any integers)."""
    user: torch.Tensor
    """(N,) long row of the user state in `interest`, `strength`, `signup`."""
    item: torch.Tensor
    """(N,) long service index."""
    position: torch.Tensor
    """(N,) long 0-based position of the service in its slate."""
    clicked: torch.Tensor
    """(N,) 0/1 whether the impression was clicked."""
    propensity: torch.Tensor | None = None
    """(N,) probability the logging policy had of showing the item there; NaN where unknown."""
    item_expert: torch.Tensor | None = None
    """(S,) long id of each service's expert (any integers); no expert effects when None."""

    @property
    def n_impressions(self) -> int:
        return self.slate.shape[0]

    def select(self, rows: torch.Tensor) -> ChoiceData:
        """The impressions at `rows`, sharing the user and service tensors."""
        return ChoiceData(
            self.interest,
            self.strength,
            self.signup,
            self.topic,
            self.item_numeric,
            self.slate[rows],
            self.user[rows],
            self.item[rows],
            self.position[rows],
            self.clicked[rows],
            None if self.propensity is None else self.propensity[rows],
            self.item_expert,
        )


class ChoiceModel(nn.Module):
    """Conditional logit: a user picks one slate item or nothing (utility 0).

    u(user, item, pos) = interest_u' W e_topic + a * signup_u[topic]
        + b * strength_u * interest_u[topic] + theta' numeric_item + topic_bias[topic]
        + expert_effect[expert] + position_bias[pos] + intercept, with position_bias[0] = 0.

    Expert effects are kept per expert id (a buffer of the ids seen in the fit), so a
    catalogue in any order finds them; an expert unseen in the fit has effect 0, the mean of
    the shrunk effects.
    """

    def __init__(
        self,
        n_topics: int,
        n_numeric: int,
        n_positions: int,
        use_strength: bool = True,
        position_only: bool = False,
        n_experts: int = 0,
    ) -> None:
        """Create a model with every coefficient at zero.

        Args:
            n_topics: T, the number of topics.
            n_numeric: F, the number of numeric service features.
            n_positions: slate positions with their own bias; later ones share the last.
            use_strength: include the strength-times-interest term.
            position_only: use only position biases and the intercept (the baseline).
            n_experts: E, experts with an effect of their own (0: none); set their ids
                with `set_expert_ids` before use.
        """
        super().__init__()
        self.config = {
            "n_topics": n_topics,
            "n_numeric": n_numeric,
            "n_positions": n_positions,
            "use_strength": use_strength,
            "position_only": position_only,
            "n_experts": n_experts,
        }
        self.affinity = nn.Parameter(torch.zeros(n_topics, n_topics))
        self.signup_coef = nn.Parameter(torch.zeros(()))
        self.strength_coef = nn.Parameter(torch.zeros(()))
        self.numeric_coef = nn.Parameter(torch.zeros(n_numeric))
        self.topic_bias = nn.Parameter(torch.zeros(n_topics))
        self.later_position_bias = nn.Parameter(torch.zeros(max(n_positions - 1, 0)))
        self.intercept = nn.Parameter(torch.zeros(()))
        self.expert_effect = nn.Parameter(torch.zeros(n_experts))
        self.register_buffer("expert_ids", torch.arange(n_experts))

    def set_expert_ids(self, expert_ids: torch.Tensor) -> None:
        """Name the experts the effects belong to: (E,) distinct ids in increasing order."""
        if expert_ids.shape != self.expert_ids.shape:
            raise ValueError(f"expected {self.expert_ids.shape[0]} expert ids")
        self.expert_ids.copy_(expert_ids.long())

    def expert_effects(self, expert: torch.Tensor | None) -> torch.Tensor | float:
        """Effect of each expert id in `expert` (any shape); 0 for ids unseen in the fit."""
        if expert is None or self.config.get("n_experts", 0) == 0:
            return 0.0
        expert = expert.long().to(self.expert_ids.device)
        row = torch.searchsorted(self.expert_ids, expert).clamp(max=self.expert_ids.shape[0] - 1)
        known = self.expert_ids[row] == expert
        return torch.where(known, self.expert_effect[row], 0.0)

    @property
    def position_bias(self) -> torch.Tensor:
        """(n_positions,) bias of each slate position; position 0 is the reference."""
        return torch.cat([self.later_position_bias.new_zeros(1), self.later_position_bias])

    def item_utilities(
        self, topic: torch.Tensor, numeric: torch.Tensor, expert: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(S,) the part of the utility that depends on the service (and its expert) alone."""
        if self.config["position_only"]:
            return numeric.new_zeros(topic.shape[0])
        utility = numeric @ self.numeric_coef + self.topic_bias[topic]
        return utility + self.expert_effects(expert)

    def _utility(
        self,
        interest: torch.Tensor,
        strength: torch.Tensor,
        signup: torch.Tensor,
        item_topic: torch.Tensor,
        item_part: torch.Tensor,
        positions: torch.Tensor | None,
    ) -> torch.Tensor:
        """(B, K) utilities from user rows (B, ...) and item topics and item parts (B, K)."""
        utility = item_part + self.intercept
        if positions is not None:
            last = self.config["n_positions"] - 1
            utility = utility + self.position_bias[positions.clamp(max=last)]
        if self.config["position_only"]:
            return utility
        utility = utility + (interest @ self.affinity).gather(1, item_topic)
        utility = utility + self.signup_coef * signup.gather(1, item_topic)
        if self.config["use_strength"]:
            own_interest = interest.gather(1, item_topic)
            utility = utility + self.strength_coef * strength.unsqueeze(1) * own_interest
        return utility

    def utilities(
        self,
        state: UserState,
        items: Catalogue,
        slates: torch.Tensor,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Utilities of slate items against a no-click utility of 0.

        Args:
            state: B users.
            items: the catalogue the slates index.
            slates: (B, K) long catalogue indices.
            positions: (B, K) or (K,) long positions; 0..K-1 when omitted.

        Returns:
            (B, K) utilities.
        """
        if positions is None:
            positions = torch.arange(slates.shape[1], device=slates.device)
        positions = positions.expand_as(slates)
        item_part = self.item_utilities(items.topic, items.numeric, items.expert)[slates]
        return self._utility(
            state.interest, state.strength, state.signup, items.topic[slates], item_part, positions
        )

    def all_item_utilities(
        self,
        interest: torch.Tensor,
        strength: torch.Tensor,
        signup: torch.Tensor,
        topic: torch.Tensor,
        numeric: torch.Tensor,
        expert: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, S) utility of every service shown at position 0 to each of B users."""
        batch = interest.shape[0]
        item_topic = topic.unsqueeze(0).expand(batch, -1)
        item_part = self.item_utilities(topic, numeric, expert).unsqueeze(0).expand(batch, -1)
        return self._utility(interest, strength, signup, item_topic, item_part, None)

    def impression_utilities(self, data: ChoiceData) -> torch.Tensor:
        """(N,) utility of each logged impression: `_utility`'s sum for each one.

        The user terms are formed per user state and then read once per impression, never
        as (N, T) rows of interests: fitting evaluates this hundreds of times over every
        logged impression, and the (N, T) gathers and their gradients were most of its cost.
        """
        item_part = self.item_utilities(data.topic, data.item_numeric, data.item_expert)
        last = self.config["n_positions"] - 1
        utility = (item_part[data.item] + self.intercept
                   + self.position_bias[data.position.clamp(max=last)])
        if self.config["position_only"]:
            return utility
        user, topic = data.user, data.topic[data.item]
        utility = utility + (data.interest @ self.affinity)[user, topic]
        utility = utility + self.signup_coef * data.signup[user, topic]
        if self.config["use_strength"]:
            utility = utility + (self.strength_coef * data.strength[user]
                                 * data.interest[user, topic])
        return utility

    def l2_penalty(self) -> torch.Tensor:
        """Sum of squares of every coefficient except the intercept and the expert effects."""
        skipped = ("intercept", "expert_effect")
        return sum(
            (p.square().sum() for name, p in self.named_parameters() if name not in skipped),
            torch.zeros((), dtype=self.intercept.dtype, device=self.intercept.device),
        )

    def save(self, path: str | Path, metadata: dict[str, Any] | None = None) -> None:
        """Write the config (JSON-able), the state dict and optional metadata to one file."""
        payload = {
            "config": dict(self.config),
            "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()},
            "metadata": metadata or {},
        }
        torch.save(payload, Path(path))

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu") -> ChoiceModel:
        """Restore a model written by `save`."""
        payload = torch.load(Path(path), map_location=map_location, weights_only=True)
        return cls.from_payload(payload)

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> ChoiceModel:
        """Rebuild a model from a dict with `config` and `state_dict`."""
        config, state = dict(payload["config"]), dict(payload["state_dict"])
        if "expert_ids" not in state:  # saved before expert effects existed
            config["n_experts"] = 0
            state["expert_effect"] = torch.zeros(0)
            state["expert_ids"] = torch.zeros(0, dtype=torch.long)
        model = cls(**config)
        model.load_state_dict(state)
        return model


def slate_negative_log_likelihood(
    utility: torch.Tensor, slate: torch.Tensor, clicked: torch.Tensor, n_slates: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-slate multinomial log-loss with a no-click option of utility 0.

    A slate with several clicks counts each click as a separate choice from the full slate
    (the clicked items are not removed), so its loss is the sum of those choices' losses.

    Args:
        utility: (N,) utility of each impression.
        slate: (N,) long slate index in 0..n_slates-1.
        clicked: (N,) 0/1 clicks.
        n_slates: the number of slates.

    Returns:
        (n_slates,) negative log-likelihood, and (N,) choice probability of each impression.
    """
    reference = utility.new_zeros(n_slates).scatter_reduce(
        0, slate, utility.detach(), "amax", include_self=True
    )
    shifted = torch.exp(utility - reference[slate])
    log_denominator = reference + torch.log(
        torch.exp(-reference) + utility.new_zeros(n_slates).index_add(0, slate, shifted)
    )
    n_clicks = utility.new_zeros(n_slates).index_add(0, slate, clicked)
    clicked_utility = utility.new_zeros(n_slates).index_add(0, slate, clicked * utility)
    nll = n_clicks.clamp(min=1) * log_denominator - clicked_utility
    return nll, torch.exp(utility - log_denominator[slate])


def calibration_by_decile(
    probability: torch.Tensor, outcome: torch.Tensor, bins: int = 10
) -> list[dict[str, float]]:
    """Predicted against observed click rate in equal-count bins of predicted probability.

    Returns:
        One dict per non-empty bin, lowest predictions first: `bin`, `n`, `predicted`
        (mean predicted probability) and `observed` (click rate).
    """
    order = torch.argsort(probability)
    rows = []
    for index, chunk in enumerate(torch.tensor_split(order, bins)):
        if chunk.numel():
            rows.append({
                "bin": index,
                "n": int(chunk.numel()),
                "predicted": probability[chunk].mean().item(),
                "observed": outcome[chunk].float().mean().item(),
            })
    return rows


def calibration_error(probability: torch.Tensor, outcome: torch.Tensor, bins: int = 10) -> float:
    """Expected calibration error over equal-count bins of predicted probability."""
    total = sum(row["n"] for row in calibration_by_decile(probability, outcome, bins))
    return sum(
        abs(row["predicted"] - row["observed"]) * row["n"] / total
        for row in calibration_by_decile(probability, outcome, bins)
    )


def slate_weights(
    propensity: torch.Tensor | None, slate: torch.Tensor, n_slates: int, max_weight: float = 20.0
) -> torch.Tensor:
    """(n_slates,) inverse-propensity weight of each slate, with mean 1.

    A slate's weight is the inverse of the geometric mean of its impressions' logged
    propensities, clipped at `max_weight`; impressions without a propensity (NaN) count as 1.
    Slates the serving policy showed rarely (exploration) weigh more, so the fit leans less on
    where the old policy concentrated its slates.

    Args:
        propensity: (N,) per-impression propensities, NaN where unknown; None: all weights 1.
        slate: (N,) long slate index in 0..n_slates-1.
        n_slates: the number of slates.
        max_weight: the largest weight before normalisation.
    """
    if propensity is None or n_slates == 0:
        return torch.ones(n_slates, dtype=torch.float64, device=slate.device)
    # Limitation: the product of the slot propensities is the slate's exact probability,
    # but its inverse explodes with the slate's length; the geometric mean with clipping
    # trades that bias for a variance the fit can live with.
    known = ~torch.isnan(propensity)
    log_p = torch.where(known, propensity.clamp(min=1e-6).log(), 0.0)
    total = log_p.new_zeros(n_slates).index_add(0, slate, log_p)
    count = log_p.new_zeros(n_slates).index_add(0, slate, known.to(log_p.dtype))
    weight = torch.exp(-total / count.clamp(min=1.0)).clamp(max=max_weight)
    return weight / weight.mean()


def _as_fit_data(data: ChoiceData, dtype: torch.dtype) -> ChoiceData:
    return ChoiceData(
        data.interest.to(dtype),
        data.strength.to(dtype),
        data.signup.to(dtype),
        data.topic.long(),
        data.item_numeric.to(dtype),
        data.slate.long(),
        data.user.long(),
        data.item.long(),
        data.position.long(),
        data.clicked.to(dtype),
        None if data.propensity is None else data.propensity.to(dtype),
        None if data.item_expert is None else data.item_expert.long(),
    )


def _fit(
    model: ChoiceModel,
    data: ChoiceData,
    slate: torch.Tensor,
    n_slates: int,
    l2: float,
    max_iter: int,
    weight: torch.Tensor | None = None,
    expert_l2: float = 0.0,
) -> float:
    """Minimise the (weighted) mean per-slate log-loss plus penalties with full-batch L-BFGS.

    The expert effects have a penalty of their own, `expert_l2`: a Gaussian prior that
    shrinks experts with few impressions towards 0 (a random effect, fitted as a ridge).
    """
    optimizer = torch.optim.LBFGS(
        model.parameters(),
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        nll, _ = slate_negative_log_likelihood(
            model.impression_utilities(data), slate, data.clicked, n_slates
        )
        mean_nll = nll.mean() if weight is None else (weight * nll).sum() / weight.sum()
        loss = mean_nll + l2 * model.l2_penalty()
        if expert_l2:
            loss = loss + expert_l2 * model.expert_effect.square().sum()
        loss.backward()
        return loss

    return float(optimizer.step(closure).detach())


def _evaluate(
    model: ChoiceModel, data: ChoiceData, slate: torch.Tensor, n_slates: int
) -> tuple[float, torch.Tensor]:
    with torch.no_grad():
        nll, probability = slate_negative_log_likelihood(
            model.impression_utilities(data), slate, data.clicked, n_slates
        )
    return nll.mean().item(), probability


def fit_choice_model(
    data: ChoiceData,
    n_topics: int,
    *,
    max_iter: int = 200,
    l2: float = 1e-4,
    seed: int = 0,
    holdout_fraction: float = 0.2,
    use_strength: bool = True,
    expert_prior_sd: float = 0.5,
    use_propensity: bool = True,
) -> tuple[ChoiceModel, dict[str, Any]]:
    """Fit the choice model on a random share of slates and score it on the rest.

    Args:
        data: the logged impressions and the tensors they index.
        n_topics: T.
        max_iter: L-BFGS iterations (full batch, float64).
        l2: weight of the squared-coefficient penalty on the mean per-slate log-loss.
        seed: seed of the train/held-out split.
        holdout_fraction: share of slates held out for the metrics.
        use_strength: include the strength-times-interest term.
        expert_prior_sd: standard deviation of the Gaussian prior that shrinks each expert's
            effect towards 0 (used where `data` names the services' experts); experts with
            few impressions stay near 0, busy ones are fitted by their own clicks.
        use_propensity: weight training slates by their inverse logged propensity
            (`slate_weights`) where `data` has propensities.

    Returns:
        The model fitted on the training slates (float32), and metrics: `train_logloss`,
        `heldout_logloss`, `baseline_heldout_logloss` (position biases and intercept only),
        `heldout_click_rate`, `heldout_predicted_click_rate`, `heldout_calibration_error`,
        `calibration_deciles` (a list of per-decile predicted and observed click rates on
        the held-out impressions), `n_experts`, `propensity_share` (share of impressions
        with a logged propensity), slate counts and `fit_seconds`. Held-out figures are
        unweighted: they describe the logs as they are.
    """
    started = time.perf_counter()
    data = _as_fit_data(data, torch.float64)
    slate_ids, slate = torch.unique(data.slate, return_inverse=True)
    n_slates = slate_ids.shape[0]

    # Limitation: slates are held out at random, not by day, so the held-out loss does not
    # measure drift; and the returned model is not refitted on the held-out slates.
    generator = torch.Generator().manual_seed(seed)
    n_holdout = int(round(holdout_fraction * n_slates))
    is_holdout = torch.zeros(n_slates, dtype=torch.bool)
    is_holdout[torch.randperm(n_slates, generator=generator)[:n_holdout]] = True
    is_holdout = is_holdout.to(slate.device)

    def part(holdout: bool) -> tuple[ChoiceData, torch.Tensor, int]:
        rows = is_holdout[slate] == holdout
        _, local = torch.unique(slate[rows], return_inverse=True)
        count = int(local.max().item()) + 1 if local.numel() else 0
        return data.select(rows), local, count

    train, train_slate, n_train = part(False)
    held, held_slate, n_held = part(True)
    n_positions = int(data.position.max().item()) + 1
    n_numeric = data.item_numeric.shape[1]
    expert_ids = None if data.item_expert is None else torch.unique(data.item_expert).cpu()
    n_experts = 0 if expert_ids is None else expert_ids.shape[0]
    propensity = train.propensity if use_propensity else None
    weight = slate_weights(propensity, train_slate, n_train) if propensity is not None else None

    model = ChoiceModel(
        n_topics, n_numeric, n_positions, use_strength=use_strength, n_experts=n_experts
    )
    if expert_ids is not None:
        model.set_expert_ids(expert_ids)
    baseline = ChoiceModel(n_topics, n_numeric, n_positions, position_only=True)
    metrics: dict[str, Any] = {
        "n_train_slates": n_train,
        "n_heldout_slates": n_held,
        "n_experts": n_experts,
        "propensity_share": 0.0
        if data.propensity is None
        else (~torch.isnan(data.propensity)).double().mean().item(),
    }
    for name, candidate in (("", model), ("baseline_", baseline)):
        candidate.to(device=data.interest.device, dtype=torch.float64)
        expert_l2 = 1.0 / (2.0 * expert_prior_sd**2 * max(n_train, 1))
        _fit(candidate, train, train_slate, n_train, l2, max_iter, weight, expert_l2)
        metrics[f"{name}train_logloss"], _ = _evaluate(candidate, train, train_slate, n_train)
        if n_held:
            metrics[f"{name}heldout_logloss"], probability = _evaluate(
                candidate, held, held_slate, n_held
            )
            if not name:
                metrics["heldout_click_rate"] = held.clicked.mean().item()
                metrics["heldout_predicted_click_rate"] = probability.mean().item()
                metrics["heldout_calibration_error"] = calibration_error(probability, held.clicked)
                metrics["calibration_deciles"] = calibration_by_decile(probability, held.clicked)

    metrics["fit_seconds"] = time.perf_counter() - started
    logger.info(
        "choice model fitted on %d slates in %.1f s: train %.4f, held-out %.4f, position-only %.4f",
        n_train,
        metrics["fit_seconds"],
        metrics["train_logloss"],
        metrics.get("heldout_logloss", float("nan")),
        metrics.get("baseline_heldout_logloss", float("nan")),
    )
    return model.float(), metrics
