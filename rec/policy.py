"""Slate policies as the publisher sees them: score users against services, pick top-N.

This module imports torch alone, so that publishing never needs the training stack. It also
defines how user and service feature vectors are laid out, for every policy alike.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

logger = logging.getLogger(__name__)

POLICY_CLASSES: dict[str, str] = {
    "two_tower": "rec.policy:TwoTowerPolicy",
    "random": "rec.agents.baselines:RandomPolicy",
    "popularity": "rec.agents.baselines:PopularityPolicy",
    "myopic": "rec.agents.baselines:MyopicPolicy",
}
"""Where `load_slate_policy` finds the class of each saved `kind` (imported on demand)."""


def user_feature_matrix(
    interest: torch.Tensor, strength: torch.Tensor, signup: torch.Tensor
) -> torch.Tensor:
    """(U, 2T + 1) user features: [interest shares (T), strength (1), sign-up topics (T)]."""
    return torch.cat([interest.float(), strength.float().unsqueeze(1), signup.float()], dim=1)


def split_user_features(
    user_features: torch.Tensor, n_topics: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Undo `user_feature_matrix`: (interest, strength, signup)."""
    t = n_topics
    return user_features[:, :t], user_features[:, t], user_features[:, t + 1 : 2 * t + 1]


def item_feature_matrix(
    topic: torch.Tensor, item_numeric: torch.Tensor, n_topics: int
) -> torch.Tensor:
    """(S, T + F) service features: [one-hot topic (T), standardised numerics (F)]."""
    one_hot = nn.functional.one_hot(topic.long(), n_topics).to(item_numeric.dtype)
    return torch.cat([one_hot, item_numeric], dim=1).float()


def split_item_features(
    item_features: torch.Tensor, n_topics: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Undo `item_feature_matrix`: (topic (S,) long, numerics (S, F))."""
    return item_features[:, :n_topics].argmax(dim=1), item_features[:, n_topics:]


def gumbel_top_k(logits: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """(B, k) indices drawn without replacement from softmax(logits), row by row."""
    uniform = torch.rand(logits.shape, generator=generator, device=logits.device)
    gumbel = -torch.log(-torch.log(uniform.clamp(1e-20, 1.0 - 1e-7)))
    return torch.topk(logits + gumbel, k, dim=1).indices


def top_n_with_exploration(
    scores: torch.Tensor, n: int, exploration: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fill n slots per user: mostly the best remaining service, sometimes a softmax draw.

    At each slot, with probability 1 - exploration the highest-scoring remaining service is
    taken, else one is sampled from the softmax of the remaining scores. The propensity of
    the chosen service at its slot is (1 - exploration) * 1[it is the remaining argmax]
    + exploration * softmax_remaining(it), so it is always above 0.

    Args:
        scores: (B, S) logits; pass users in batches to bound memory (a few B x S tensors).
        n: slots per user, at most S.
        exploration: probability of sampling a slot instead of taking the argmax.
        generator: the seeded source of randomness, on the scores' device.

    Returns:
        indices (B, n) long, distinct within a row, and propensities (B, n).
    """
    batch, n_items = scores.shape
    if n > n_items:
        raise ValueError(f"cannot pick {n} distinct services out of {n_items}")
    remaining = scores.detach().float().clone()
    rows = torch.arange(batch, device=scores.device)
    indices = torch.empty(batch, n, dtype=torch.long, device=scores.device)
    propensities = torch.empty(batch, n, device=scores.device)
    for slot in range(n):
        best = remaining.argmax(dim=1)
        probability = torch.softmax(remaining, dim=1)
        if exploration > 0:
            sampled = gumbel_top_k(remaining, 1, generator).squeeze(1)
            explore = torch.rand(batch, generator=generator, device=scores.device) < exploration
            chosen = torch.where(explore, sampled, best)
        else:
            chosen = best
        greedy_share = (1.0 - exploration) * (chosen == best).float()
        propensities[:, slot] = greedy_share + exploration * probability[rows, chosen]
        indices[:, slot] = chosen
        remaining[rows, chosen] = float("-inf")
    return indices, propensities


class SlatePolicy(nn.Module):
    """A policy that scores every service for every user; higher is better.

    Subclasses set `kind`, keep their constructor arguments JSON-able in `self.config`,
    and implement `score`.
    """

    kind: ClassVar[str] = ""

    def __init__(self) -> None:
        super().__init__()
        self.config: dict[str, Any] = {}
        self.metadata: dict[str, Any] = {}

    def score(self, user_features: torch.Tensor, item_features: torch.Tensor) -> torch.Tensor:
        """(B, S) logits of services (S, D_item) for users (B, D_user)."""
        raise NotImplementedError

    def select(self, user: torch.Tensor, docs: torch.Tensor, k: int) -> list[int]:
        """The k best distinct candidates for one user.

        Args:
            user: (D_user,) one user's features.
            docs: (C, D_item) candidate services.
            k: how many to pick, at most C.

        Returns:
            Candidate indices, best first.
        """
        with torch.no_grad():
            scores = self.score(user.unsqueeze(0), docs)[0]
        return torch.topk(scores, k).indices.tolist()

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> SlatePolicy:
        """An untrained policy of this kind; `load_slate_policy` fills in the state."""
        return cls(**config)

    def save(self, path: str | Path, metadata: dict[str, Any] | None = None) -> None:
        """Write kind, config, state dict and metadata (e.g. model_version) to one file."""
        payload = {
            "kind": self.kind,
            "config": dict(self.config),
            "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()},
            "metadata": dict(metadata or {}),
        }
        torch.save(payload, Path(path))
        logger.info("saved %s policy to %s", self.kind, path)


def _policy_class(kind: str) -> type[SlatePolicy]:
    if kind not in POLICY_CLASSES:
        raise ValueError(f"unknown policy kind {kind!r}; known: {sorted(POLICY_CLASSES)}")
    module_name, class_name = POLICY_CLASSES[kind].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def load_slate_policy(path: str | Path, map_location: str | torch.device = "cpu") -> SlatePolicy:
    """Restore any policy written by `SlatePolicy.save`, in eval mode.

    Its metadata is kept on the returned policy as `policy.metadata`.
    """
    payload = torch.load(Path(path), map_location=map_location, weights_only=True)
    policy = _policy_class(payload["kind"]).from_config(payload["config"])
    policy.load_state_dict(payload["state_dict"])
    policy.metadata = payload.get("metadata", {})
    return policy.eval()


class TwoTowerPolicy(SlatePolicy):
    """Softmax policy over all services: logits = f(user) . g(service) + bias(service).

    f is a small MLP of the user features; g embeds the topic and maps the numerics linearly,
    so new services and new catalogues are scored without retraining. The bias is linear in
    the service features for the same reason.
    """

    kind: ClassVar[str] = "two_tower"

    def __init__(
        self,
        n_topics: int,
        n_numeric: int,
        embed_dim: int = 16,
        hidden_dim: int = 64,
        logit_cap: float = 25.0,
    ) -> None:
        """Create the towers.

        Args:
            n_topics: T.
            n_numeric: F, numeric service features.
            embed_dim: size of the shared user / service embedding.
            hidden_dim: width of the user MLP.
            logit_cap: logits are squashed into (-cap, cap), which keeps the softmax away
                from exact zeros, so log-probabilities stay finite.
        """
        super().__init__()
        self.config = {
            "n_topics": n_topics,
            "n_numeric": n_numeric,
            "embed_dim": embed_dim,
            "hidden_dim": hidden_dim,
            "logit_cap": logit_cap,
        }
        self.user_tower = nn.Sequential(
            nn.Linear(2 * n_topics + 1, hidden_dim),
            nn.Tanh(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.Tanh(),
            nn.Linear(hidden_dim, embed_dim),
        )
        self.topic_embedding = nn.Embedding(n_topics, embed_dim)
        self.numeric_embedding = nn.Linear(n_numeric, embed_dim, bias=False)
        self.item_bias = nn.Linear(n_topics + n_numeric, 1)
        nn.init.normal_(self.topic_embedding.weight, std=0.1)

    def item_embedding(self, item_features: torch.Tensor) -> torch.Tensor:
        """(S, embed_dim) embedding g of each service."""
        topic, numeric = split_item_features(item_features, self.config["n_topics"])
        return self.topic_embedding(topic) + self.numeric_embedding(numeric)

    def score(self, user_features: torch.Tensor, item_features: torch.Tensor) -> torch.Tensor:
        """(B, S) logits."""
        users = self.user_tower(user_features)
        items = self.item_embedding(item_features)
        logits = users @ items.T + self.item_bias(item_features).squeeze(1)
        cap = self.config["logit_cap"]
        return cap * torch.tanh(logits / cap)
