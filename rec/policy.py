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

from rec import topn

logger = logging.getLogger(__name__)

POLICY_CLASSES: dict[str, str] = {
    "two_tower": "rec.policy:TwoTowerPolicy",
    "random": "rec.agents.baselines:RandomPolicy",
    "popularity": "rec.agents.baselines:PopularityPolicy",
    "myopic": "rec.agents.baselines:MyopicPolicy",
    "candidate_softmax": "rec.policy:CandidateSoftmaxPolicy",
    "slateq": "rec.policy:SlateQPolicy",
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
    `rec.topn` draws from exactly this distribution without a softmax per slot.

    Args:
        scores: (B, S) logits; pass users in batches to bound memory (a few B x S tensors).
        n: slots per user, at most S.
        exploration: probability of sampling a slot instead of taking the argmax.
        generator: the seeded source of randomness (CPU).

    Returns:
        indices (B, n) long, distinct within a row, and propensities (B, n).
    """
    batch, n_items = scores.shape
    if n > n_items:
        raise ValueError(f"cannot pick {n} distinct services out of {n_items}")
    logits = scores.detach().float().cpu()
    shift = logits.max(dim=1, keepdim=True).values
    keys = torch.full((batch, topn.padded_width(n_items)), float("-inf"))
    keys[:, :n_items] = logits
    padded = torch.cat([logits - shift, torch.full_like(keys[:, n_items:], float("-inf"))], 1)
    cands = topn.summarise(keys, n, n_items, lambda k: k.sub_(shift).exp_(), lambda k: k)

    def block_weights(rows: torch.Tensor, blocks: torch.Tensor):
        columns = topn.block_columns(blocks, keys.shape[1] // topn.BLOCK)
        centred = padded[rows].gather(1, columns)
        return centred.exp(), centred + shift[rows]

    indices, _, propensity = topn.select(cands, exploration, generator, block_weights)
    return indices.to(scores.device), propensity.to(scores.device)


def top_n_for_policy(
    policy: SlatePolicy, user_features: torch.Tensor, item_features: torch.Tensor, n: int,
    exploration: float, generator: torch.Generator | topn.CounterUniforms,
    cache_rows: int = 256,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`top_n_with_exploration` of the policy's scores: (indices, scores, propensities).

    Policies with a `factors` method (score = cap * tanh(u . v / cap)) are scored
    `cache_rows` users at a time into one reused buffer, so the (B, S) scores never leave
    the CPU cache; others are scored 8192 users at a time and passed to
    `top_n_with_exploration`. A `rec.topn.CounterUniforms` in place of the generator
    works for policies with `factors` only.
    """
    n_items = item_features.shape[0]
    if n > n_items:
        raise ValueError(f"cannot pick {n} distinct services out of {n_items}")
    factors = getattr(policy, "factors", None)
    with torch.no_grad():
        if factors is None:
            if isinstance(generator, topn.CounterUniforms):
                raise TypeError("counter-based uniforms need a policy with `factors`")
            parts = []
            for start in range(0, len(user_features), 8192):
                scores = policy.score(user_features[start:start + 8192], item_features)
                indices, propensity = top_n_with_exploration(scores, n, exploration, generator)
                parts.append((indices, scores.gather(1, indices), propensity))
            return tuple(torch.cat(column) for column in zip(*parts, strict=True))
        users, items, cap = factors(user_features, item_features)
        width = topn.padded_width(n_items)
        items_t = torch.zeros(items.shape[1], width)
        items_t[:, :n_items] = items.T
        buffer = torch.empty(cache_rows, width)
        # Limitation: each pass below (cap, exp, block max, two small topk calls) costs about
        # as much as the rank-17 matmul itself, so this runs at several times the bare matmul
        # time; reaching it needs one fused kernel (dot, cap, exp, running top-n per row).
        parts = []
        for start in range(0, len(users), cache_rows):
            block = users[start:start + cache_rows]
            keys = buffer[:len(block)]
            torch.mm(block, items_t, out=keys)
            parts.append(topn.summarise(
                keys, n, n_items,
                lambda k: k.mul_(1.0 / cap).tanh_().mul_(cap).exp_(),
                lambda k: cap * torch.tanh(k / cap)))
        cands = topn.Candidates(*(torch.cat([getattr(p, f) for p in parts]) for f in
                                  ("index", "score", "weight", "tail")))

        def block_weights(rows: torch.Tensor, blocks: torch.Tensor):
            columns = topn.block_columns(blocks, width // topn.BLOCK)
            vectors = items_t.T[columns]
            raw = torch.bmm(vectors, users[rows].unsqueeze(2)).squeeze(2)
            scored = cap * torch.tanh(raw / cap)
            return torch.where(columns < n_items, scored.exp(), 0.0), scored

        return topn.select(cands, exploration, generator, block_weights)


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

    def save(
        self, path: str | Path, metadata: dict[str, Any] | None = None,
        training: dict[str, Any] | None = None,
    ) -> None:
        """Write kind, config, state dict and metadata (e.g. model_version) to one file.

        Args:
            path: the file to write.
            metadata: JSON-able facts about the policy, read back as `policy.metadata`.
            training: state that only a warm-started training run needs (e.g. a critic and
                optimiser moments), as tensors, numbers and strings in nested dicts and
                lists; `load_slate_policy` ignores it, `load_training_state` returns it.
        """
        payload = {
            "kind": self.kind,
            "config": dict(self.config),
            "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()},
            "metadata": dict(metadata or {}),
        }
        if training is not None:
            payload["training"] = training
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


def load_training_state(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> dict[str, Any] | None:
    """The training state saved beside a policy by `SlatePolicy.save`, or None if it has none."""
    payload = torch.load(Path(path), map_location=map_location, weights_only=True)
    return payload.get("training")


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

    def user_tower_layers(self) -> list[nn.Linear]:
        """The user tower f as its linear layers, with tanh between consecutive ones.

        The user side of `factors` is f(features) followed by a constant 1 column.
        """
        return [layer for layer in self.user_tower if isinstance(layer, nn.Linear)]

    def factors(
        self, user_features: torch.Tensor, item_features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(users (B, D + 1), services (S, D + 1), cap): logits = cap * tanh(u . v / cap).

        The service bias rides in the last column against a constant 1 on the user side.
        """
        users = self.user_tower(user_features)
        ones = torch.ones(len(users), 1)
        items = self.item_embedding(item_features)
        bias = self.item_bias(item_features)
        return (torch.cat([users, ones], 1), torch.cat([items, bias], 1),
                float(self.config["logit_cap"]))

    def score(self, user_features: torch.Tensor, item_features: torch.Tensor) -> torch.Tensor:
        """(B, S) logits."""
        users = self.user_tower(user_features)
        items = self.item_embedding(item_features)
        logits = users @ items.T + self.item_bias(item_features).squeeze(1)
        cap = self.config["logit_cap"]
        return cap * torch.tanh(logits / cap)


def pair_features(user: torch.Tensor, docs: torch.Tensor, n_topics: int) -> torch.Tensor:
    """(B, C, 2T + 1) features of each (user, candidate): [interest, one-hot, affinity].

    Args:
        user: (B, D_user) users; the first T columns are the interest vector.
        docs: (B, C, D_item) or (C, D_item) candidates; the first T columns are the one-hot
            topic.
        n_topics: T.
    """
    interest = user[:, :n_topics].float()
    topic = docs[..., :n_topics].float()
    if topic.dim() == 2:
        topic = topic.unsqueeze(0).expand(len(interest), -1, -1)
    interest = interest.unsqueeze(1).expand(-1, topic.shape[1], -1)
    affinity = (interest * topic).sum(dim=2, keepdim=True)
    return torch.cat([interest, topic, affinity], dim=2)


def _mlp(n_in: int, hidden_dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(n_in, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, hidden_dim), nn.ReLU()
    )


class CandidateSoftmaxPolicy(SlatePolicy):
    """Softmax over a step's candidates: logit = head(trunk(user, candidate)).

    A second head over the same trunk estimates the behaviour policy that logged the data
    (Chen et al. 2019); it reads the trunk's output detached, so fitting it never moves the
    main policy. Slates are the K highest logits (greedy) or K Gumbel draws (training).
    """

    kind: ClassVar[str] = "candidate_softmax"

    def __init__(self, n_topics: int, hidden_dim: int = 64) -> None:
        """Args: n_topics: T; hidden_dim: width of the trunk."""
        super().__init__()
        self.config = {"n_topics": n_topics, "hidden_dim": hidden_dim}
        self.trunk = _mlp(2 * n_topics + 1, hidden_dim)
        self.policy_head = nn.Linear(hidden_dim, 1)
        self.behaviour_head = nn.Linear(hidden_dim, 1)

    def logits(self, user: torch.Tensor, docs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C) policy logits and (B, C) behaviour logits (the latter without trunk grad)."""
        hidden = self.trunk(pair_features(user, docs, self.config["n_topics"]))
        policy = self.policy_head(hidden).squeeze(2)
        behaviour = self.behaviour_head(hidden.detach()).squeeze(2)
        return policy, behaviour

    def score(self, user_features: torch.Tensor, item_features: torch.Tensor) -> torch.Tensor:
        """(B, S) policy logits of every service."""
        return self.logits(user_features, item_features)[0]

    def select_slates(self, user: torch.Tensor, docs: torch.Tensor, k: int) -> torch.Tensor:
        """(B, k) the k highest-logit candidates of each row (docs (B, C, D_item))."""
        return torch.topk(self.logits(user, docs)[0], k, dim=1).indices


class SlateQPolicy(SlatePolicy):
    """SlateQ (Ie et al. 2019): item-wise long-term values combined by the choice model.

    Q(user, item) is the expected return after the user clicks the item, Q(user, none) after
    no click. A slate's value is sum_i P(i | slate) Q(i) + P(none | slate) Q(none), with the
    proportional choice model P(i | slate) = w_i / (w_none + sum_j w_j), w_i = affinity_i -
    min_normalizer, which `select_slates` maximises over every K-subset of the candidates.
    """

    kind: ClassVar[str] = "slateq"

    def __init__(
        self,
        n_topics: int,
        hidden_dim: int = 64,
        no_click_weight: float = 2.0,
        min_normalizer: float = -1.0,
        value_scale: float = 100.0,
    ) -> None:
        """Create the value networks.

        Args:
            n_topics: T.
            hidden_dim: width of the networks.
            no_click_weight: w_none of the choice model.
            min_normalizer: the shift making affinities into choice weights.
            value_scale: the networks output values divided by this (returns are hundreds).
        """
        super().__init__()
        self.config = {
            "n_topics": n_topics,
            "hidden_dim": hidden_dim,
            "no_click_weight": no_click_weight,
            "min_normalizer": min_normalizer,
            "value_scale": value_scale,
        }
        n_pair = 2 * n_topics + 1
        self.item_value = nn.Sequential(_mlp(n_pair, hidden_dim), nn.Linear(hidden_dim, 1))
        self.none_value = nn.Sequential(_mlp(n_topics, hidden_dim), nn.Linear(hidden_dim, 1))
        self._subsets: dict[tuple[int, int], torch.Tensor] = {}

    def item_q(self, user: torch.Tensor, docs: torch.Tensor) -> torch.Tensor:
        """(B, C) Q(user, candidate), in return units: Q(user, none) plus the item's gain.

        Learning the gain over not clicking, rather than two free values, keeps the
        differences that decide the slate from drowning in the value of the user's state.
        """
        features = pair_features(user, docs, self.config["n_topics"])
        gain = self.item_value(features).squeeze(2) * self.config["value_scale"]
        return gain + self.none_q(user).unsqueeze(1)

    def none_q(self, user: torch.Tensor) -> torch.Tensor:
        """(B,) Q(user, no click), in return units."""
        interest = user[:, : self.config["n_topics"]].float()
        return self.none_value(interest).squeeze(1) * self.config["value_scale"]

    def choice_weights(self, user: torch.Tensor, docs: torch.Tensor) -> torch.Tensor:
        """(B, C) proportional-choice weight of each candidate."""
        affinity = pair_features(user, docs, self.config["n_topics"])[..., -1]
        return (affinity - self.config["min_normalizer"]).clamp(min=0.0)

    def subsets(self, n_candidates: int, k: int, device: torch.device) -> torch.Tensor:
        """(M, k) every k-subset of the candidate positions (order is irrelevant here)."""
        key = (n_candidates, k)
        if key not in self._subsets:
            self._subsets[key] = torch.combinations(torch.arange(n_candidates), k)
        return self._subsets[key].to(device)

    def slate_value(
        self, q: torch.Tensor, q_none: torch.Tensor, weights: torch.Tensor, slates: torch.Tensor
    ) -> torch.Tensor:
        """Slate values under the choice model, over the last axis of the gathered slates.

        Args:
            q: (B, C) item values.
            q_none: (B,) no-click values.
            weights: (B, C) choice weights.
            slates: (B, k) one slate per row, giving (B,); or (B, M, k) M slates per row,
                giving (B, M).
        """
        index = slates.flatten(1)
        q_s = q.gather(1, index).view(slates.shape)
        w_s = weights.gather(1, index).view(slates.shape)
        if slates.dim() == 3:
            q_none = q_none.unsqueeze(1)
        w_none = self.config["no_click_weight"]
        return ((w_s * q_s).sum(dim=-1) + w_none * q_none) / (w_s.sum(dim=-1) + w_none)

    def best_slates(
        self, q: torch.Tensor, q_none: torch.Tensor, weights: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, k) the slate of highest value per row, among all k-subsets, and (B,) its value."""
        subsets = self.subsets(q.shape[1], k, q.device)
        values = self.slate_value(q, q_none, weights, subsets.expand(len(q), -1, -1))
        best = values.argmax(dim=1)
        return subsets[best], values.gather(1, best.unsqueeze(1)).squeeze(1)

    def score(self, user_features: torch.Tensor, item_features: torch.Tensor) -> torch.Tensor:
        """(B, S) top-K heuristic score w_i (Q_i - Q_none): the ranking for long lists."""
        q = self.item_q(user_features, item_features)
        weights = self.choice_weights(user_features, item_features)
        return weights * (q - self.none_q(user_features).unsqueeze(1))

    def select_slates(self, user: torch.Tensor, docs: torch.Tensor, k: int) -> torch.Tensor:
        """(B, k) the best k-subset of each row's candidates (docs (B, C, D_item)), by value."""
        q, weights = self.item_q(user, docs), self.choice_weights(user, docs)
        slates, _ = self.best_slates(q, self.none_q(user), weights, k)
        worth = (weights * q).gather(1, slates)
        return slates.gather(1, worth.argsort(dim=1, descending=True))

    def select(self, user: torch.Tensor, docs: torch.Tensor, k: int) -> list[int]:
        """The k candidates of the highest slate value for one user, best first."""
        with torch.no_grad():
            return self.select_slates(user.unsqueeze(0), docs.unsqueeze(0), k)[0].tolist()
