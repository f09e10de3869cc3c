"""Reference policies the learned agent must beat: random, popularity and myopic."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from rec.choice import ChoiceModel
from rec.policy import SlatePolicy, split_item_features, split_user_features


class RandomPolicy(SlatePolicy):
    """Uniformly random scores from its own seeded generator."""

    kind: ClassVar[str] = "random"

    def __init__(self, seed: int = 0) -> None:
        """Args: seed: seed of the score draws."""
        super().__init__()
        self.config = {"seed": seed}
        self.generator = torch.Generator().manual_seed(seed)

    def score(self, user_features: torch.Tensor, item_features: torch.Tensor) -> torch.Tensor:
        """(B, S) independent uniform scores."""
        shape = (user_features.shape[0], item_features.shape[0])
        return torch.rand(shape, generator=self.generator).to(user_features.device)


class PopularityPolicy(SlatePolicy):
    """The same ranking for everyone: log of a given popularity per service."""

    kind: ClassVar[str] = "popularity"

    def __init__(self, n_items: int, popularity: torch.Tensor | None = None) -> None:
        """Set up the ranking.

        Args:
            n_items: S; the policy scores exactly this catalogue, in this order.
            popularity: (S,) non-negative popularity (e.g. recent clicks); zeros when omitted.
        """
        super().__init__()
        # Limitation: bound to one catalogue in one order; a new service has no popularity.
        self.config = {"n_items": n_items}
        values = torch.zeros(n_items) if popularity is None else popularity.float().cpu()
        self.register_buffer("popularity", values)

    def score(self, user_features: torch.Tensor, item_features: torch.Tensor) -> torch.Tensor:
        """(B, S) log popularity, the same row for every user."""
        if item_features.shape[0] != self.popularity.shape[0]:
            raise ValueError("popularity was given for a different catalogue")
        logits = torch.log(self.popularity.to(user_features.device) + 1e-6)
        return logits.unsqueeze(0).expand(user_features.shape[0], -1)


class MyopicPolicy(SlatePolicy):
    """Ranks services by the choice model's click utility for the user, today only."""

    kind: ClassVar[str] = "myopic"

    def __init__(self, choice_model: ChoiceModel) -> None:
        """Args: choice_model: the fitted user choice model."""
        super().__init__()
        self.config = {"choice_config": dict(choice_model.config)}
        self.choice_model = choice_model

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> MyopicPolicy:
        return cls(ChoiceModel(**config["choice_config"]))

    def score(self, user_features: torch.Tensor, item_features: torch.Tensor) -> torch.Tensor:
        """(B, S) utility of each service at the first slate position."""
        n_topics = self.choice_model.config["n_topics"]
        interest, strength, signup = split_user_features(user_features, n_topics)
        topic, numeric = split_item_features(item_features, n_topics)
        # Limitation: service features do not name the expert, so the choice model's expert
        # effects are left out of this ranking; it is myopic in features, not in experts.
        return self.choice_model.all_item_utilities(interest, strength, signup, topic, numeric)
