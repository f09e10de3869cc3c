"""The `recsim` preset: Google RecSim's interest-evolution environment on the batched engine.

It reproduces the environment RecSim's `create_environment` builds (20 clusters of videos,
proportional choice with a no-click option, a watch-time budget refilled by quality, interests
that drift towards or away from what is watched), so agents and speeds can be compared with
the figures published for RecSim. Episodes are rows of tensors; finished ones are masked and
dropped from the batch once they are a quarter of it.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import time
from dataclasses import dataclass
from typing import Protocol

import torch

from rec.sim.engine import ItemSampler, ProbabilityChoiceModel, sample_from_weights

logger = logging.getLogger(__name__)

N_TOPICS = 20
"""Clusters of videos; a video's observable features are the one-hot of its cluster."""
N_CANDIDATES = 10
"""Videos offered to the agent at every step, resampled after each step."""
SLATE_SIZE = 2
"""Videos the agent shows per step."""

RECSIM_RETURNS = {"random": 153.4, "myopic": 165.1, "oracle": 283.6}
"""Mean episode returns measured with Google's RecSim 0.2.4 (300 episodes, seed 0)."""
RECSIM_STEPS_PER_S = 5300.0
"""User-steps per second of Google's RecSim 0.2.4 on one core of this kind of machine."""


@dataclass
class RecSimConfig:
    """The constants of the interest-evolution environment, RecSim's defaults."""

    n_topics: int = N_TOPICS
    """Clusters (= topics = length of the interest vector)."""
    trashy_share: float = 0.7
    """Share of clusters whose mean quality lies in [min_quality, 0]; the rest in [0, max]."""
    min_quality: float = -3.0
    """Mean quality of the worst cluster."""
    max_quality: float = 3.0
    """Mean quality of the best cluster."""
    quality_std: float = 0.1
    """Standard deviation of a video's quality around its cluster's mean."""
    video_length: float = 4.0
    """Length of every video, in the budget's time units."""
    n_candidates: int = N_CANDIDATES
    """Candidates per step."""
    slate_size: int = SLATE_SIZE
    """Videos per slate."""
    time_budget: float = 200.0
    """Each user's starting budget; the episode ends when it reaches 0."""
    no_click_mass: float = 1.0
    """Score of choosing nothing, before the shift by `min_normalizer`."""
    min_normalizer: float = -1.0
    """Subtracted from every score (and from the no-click score) to make them weights."""
    step_penalty: float = 0.5
    """Budget lost by a step without a click."""
    budget_refill: float = 0.9 / 3.4
    """Budget regained per unit of watch time and quality (alpha over the quality range)."""
    interest_step: float = 0.3
    """Interest update step at interest 0; it shrinks linearly to 0 at |interest| = 1."""
    quality_swaps: tuple[tuple[int, int], ...] = ()
    """Pairs of clusters whose mean qualities trade places (none in RecSim): a drift that
    moves the optimum, as when experts' quality turns out other than the data had shown."""

    def cluster_means(self) -> torch.Tensor:
        """(n_topics,) mean quality of each cluster: trashy ones first, then nutritious,
        then `quality_swaps` applied in order."""
        n_trashy = int(self.n_topics * self.trashy_share)
        trashy = torch.linspace(self.min_quality, 0.0, n_trashy, dtype=torch.float64)
        nutritious = torch.linspace(
            0.0, self.max_quality, self.n_topics - n_trashy, dtype=torch.float64
        )
        means = torch.cat([trashy, nutritious])
        for a, b in self.quality_swaps:
            means[[a, b]] = means[[b, a]]
        return means.float()


class ClusterVideoSampler(ItemSampler):
    """Candidates are uniform cluster ids; their hidden quality is drawn when first needed."""

    def __init__(self, config: RecSimConfig, device: torch.device | str = "cpu") -> None:
        """Args: config: the environment's constants; device: where the tensors live."""
        self.config = config
        self.means = config.cluster_means().to(device)

    def sample(self, n_users: int, generator: torch.Generator) -> torch.Tensor:
        """(n_users, C) long cluster ids, uniform over the clusters."""
        shape = (n_users, self.config.n_candidates)
        return torch.randint(
            self.config.n_topics, shape, generator=generator, device=self.means.device
        )

    def quality(self, cluster: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Quality ~ Normal(cluster mean, std) for videos of the given clusters (any shape)."""
        noise = torch.randn(cluster.shape, generator=generator, device=cluster.device)
        return self.means[cluster] + self.config.quality_std * noise


class ProportionalChoice(ProbabilityChoiceModel):
    """RecSim's multinomial proportional model: weight = score - min_normalizer."""

    def __init__(self, no_click_mass: float = 1.0, min_normalizer: float = -1.0) -> None:
        """Args: no_click_mass: the no-click score; min_normalizer: the shift (<= 0)."""
        self.no_click_weight = no_click_mass - min_normalizer
        self.min_normalizer = min_normalizer

    def weights(self, scores: torch.Tensor) -> torch.Tensor:
        """(B, K + 1) weights: shifted scores, then the shifted no-click score."""
        no_click = scores.new_full((scores.shape[0], 1), self.no_click_weight)
        return torch.cat([scores - self.min_normalizer, no_click], dim=1)


@dataclass
class RecSimUsers:
    """A batch of interest-evolution users, one row per episode."""

    interest: torch.Tensor
    """(B, T) interest in each cluster, in [-1, 1]; the agent observes it."""
    budget: torch.Tensor
    """(B,) remaining time budget; hidden from the agent."""

    def index(self, rows: torch.Tensor) -> RecSimUsers:
        """The users at `rows`, as a new batch."""
        return RecSimUsers(self.interest[rows], self.budget[rows])


class InterestEvolutionUserModel:
    """Samples users and moves their interest and budget after each response."""

    def __init__(self, config: RecSimConfig) -> None:
        """Args: config: the environment's constants."""
        self.config = config

    def sample(
        self, n_users: int, generator: torch.Generator, device: torch.device | str = "cpu"
    ) -> RecSimUsers:
        """New users: interests ~ Uniform[-1, 1]^T, a full budget."""
        interest = torch.rand(n_users, self.config.n_topics, generator=generator, device=device)
        budget = torch.full((n_users,), self.config.time_budget, device=device)
        return RecSimUsers(interest.mul_(2.0).sub_(1.0), budget)

    def update(
        self,
        users: RecSimUsers,
        clicked: torch.Tensor,
        cluster: torch.Tensor,
        quality: torch.Tensor,
        watch_time: torch.Tensor,
        generator: torch.Generator,
    ) -> None:
        """Apply one step's response to the users, in place.

        After a click on a video of cluster c with interest x = interest[c], the interest in c
        moves by alpha (1 - x) with alpha = step (1 - |x|): towards the video with probability
        (x + 1) / 2, else away from it, then is clipped to [-1, 1]; the budget loses the watch
        time and regains refill * watch time * quality. Without a click it loses the penalty.

        Args:
            users: the batch, changed in place.
            clicked: (B,) bool, the user clicked a video this step.
            cluster: (B,) long cluster of the clicked video (any value where none).
            quality: (B,) hidden quality of the clicked video (any value where none).
            watch_time: (B,) time watched, 0 where nothing was clicked.
            generator: the seeded source of randomness for the direction of the update.
        """
        config = self.config
        current = users.interest.gather(1, cluster.unsqueeze(1)).squeeze(1)
        step = config.interest_step * (1.0 - current.abs()) * (1.0 - current)
        towards = torch.rand(current.shape, generator=generator, device=current.device)
        towards = towards < (current + 1.0) * 0.5
        step = torch.where(towards, step, -step) * clicked
        moved = (current + step).clamp_(-1.0, 1.0)
        users.interest.scatter_(1, cluster.unsqueeze(1), moved.unsqueeze(1))

        refill = watch_time * (config.budget_refill * quality - 1.0)
        users.budget += torch.where(clicked, refill, -config.step_penalty)


class WatchTimeResponse:
    """A click watches the whole video, or what is left of the budget."""

    def __init__(self, video_length: float) -> None:
        """Args: video_length: the length of every video."""
        self.video_length = video_length

    def watch_time(self, budget: torch.Tensor, clicked: torch.Tensor) -> torch.Tensor:
        """(B,) min(budget, length) where clicked, else 0; this is also the reward."""
        return budget.clamp(max=self.video_length) * clicked


class RecSimEnv:
    """Batched interest-evolution episodes: `reset(n)`, then `step` until no row is alive.

    Rows of the batch are episodes. A row whose budget is spent stays in the tensors, masked
    (no clicks, no reward), until finished rows are a quarter of the batch; then the alive
    rows are compacted, so later steps cost in proportion to the episodes still running.
    """

    def __init__(
        self,
        config: RecSimConfig | None = None,
        seed: int = 0,
        device: torch.device | str = "cpu",
        compact_below: float = 0.75,
    ) -> None:
        """Assemble the preset from its parts.

        Args:
            config: the environment's constants; RecSim's defaults when omitted.
            seed: seed of the environment's generator (users, candidates, choices, updates).
            device: where the tensors live.
            compact_below: compact when the alive share of the rows falls below this.
        """
        self.config = config or RecSimConfig()
        self.device = torch.device(device)
        self.sampler = ClusterVideoSampler(self.config, self.device)
        self.choice_model = ProportionalChoice(
            self.config.no_click_mass, self.config.min_normalizer
        )
        self.user_model = InterestEvolutionUserModel(self.config)
        self.response = WatchTimeResponse(self.config.video_length)
        self.compact_below = compact_below
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.n_episodes = 0

    def reset(self, n_episodes: int) -> RecSimUsers:
        """Start `n_episodes` new episodes and draw their first candidates."""
        self.n_episodes = n_episodes
        self.users = self.user_model.sample(n_episodes, self.generator, self.device)
        self.episode = torch.arange(n_episodes, device=self.device)
        self.alive = torch.ones(n_episodes, dtype=torch.bool, device=self.device)
        self.n_alive = n_episodes
        self.row_return = torch.zeros(n_episodes, device=self.device)
        self.row_clicks = torch.zeros(n_episodes, dtype=torch.int32, device=self.device)
        self.row_steps = torch.zeros(n_episodes, dtype=torch.int32, device=self.device)
        self.returns = torch.zeros(n_episodes, device=self.device)
        self.clicks = torch.zeros(n_episodes, dtype=torch.int32, device=self.device)
        self.steps = torch.zeros(n_episodes, dtype=torch.int32, device=self.device)
        self.candidates = self.sampler.sample(n_episodes, self.generator)
        self._quality: torch.Tensor | None = None
        return self.users

    @property
    def done(self) -> bool:
        return self.n_alive == 0

    def candidate_quality(self) -> torch.Tensor:
        """(B, C) hidden quality of the current candidates (for oracles), drawn once a step."""
        if self._quality is None:
            self._quality = self.sampler.quality(self.candidates, self.generator)
        return self._quality

    def step(self, slate: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Show every row a slate of its candidates.

        Args:
            slate: (B, K) long positions in 0..C-1 of each row's current candidates.

        Returns:
            reward (B,) (watch time, 0 for finished rows) and info with `choice` (B,) slate
            position clicked or -1, and `alive` (B,) bool before the step. The rows of the
            next call are those of `self.users` after this step (compaction may drop some).
        """
        users = self.users
        slate_cluster = self.candidates.gather(1, slate)
        scores = users.interest.gather(1, slate_cluster)
        choice = sample_from_weights(self.choice_model.weights(scores), self.generator)
        alive = self.alive
        clicked = (choice >= 0) & alive
        position = choice.clamp(min=0).unsqueeze(1)
        cluster = slate_cluster.gather(1, position).squeeze(1)
        if self._quality is not None:
            quality = self._quality.gather(1, slate.gather(1, position)).squeeze(1)
        else:
            # Quality is hidden and independent across videos, so drawing it only for the
            # clicked video, when no one asked for the others, leaves the episode's law as is.
            quality = self.sampler.quality(cluster, self.generator)

        watch_time = self.response.watch_time(users.budget, clicked)
        self.user_model.update(users, clicked, cluster, quality, watch_time, self.generator)
        self.row_return += watch_time
        self.row_clicks += clicked
        self.row_steps += alive
        self.alive = alive & (users.budget > 0)
        self.n_alive = int(self.alive.sum())

        info = {"choice": torch.where(clicked, choice, -1), "alive": alive}
        if self.n_alive < self.compact_below * self.alive.shape[0]:
            self._compact()
        self.candidates = self.sampler.sample(self.alive.shape[0], self.generator)
        self._quality = None
        return watch_time, info

    def _compact(self) -> None:
        finished = ~self.alive
        episode = self.episode[finished]
        self.returns[episode] = self.row_return[finished]
        self.clicks[episode] = self.row_clicks[finished]
        self.steps[episode] = self.row_steps[finished]
        keep = self.alive.nonzero().squeeze(1)
        self.users = self.users.index(keep)
        self.episode = self.episode[keep]
        self.alive = self.alive[keep]
        self.row_return = self.row_return[keep]
        self.row_clicks = self.row_clicks[keep]
        self.row_steps = self.row_steps[keep]

    def results(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N,) return, clicks and steps of every episode since `reset` (finished or not)."""
        returns, clicks, steps = self.returns.clone(), self.clicks.clone(), self.steps.clone()
        returns[self.episode] = self.row_return
        clicks[self.episode] = self.row_clicks
        steps[self.episode] = self.row_steps
        return returns, clicks, steps


class RecSimPolicy(Protocol):
    """Chooses each row's slate from its candidates."""

    def select(self, env: RecSimEnv) -> torch.Tensor:
        """(B, K) long candidate positions for the rows of `env.users`."""
        ...


class RandomSlatePolicy:
    """K distinct candidates uniformly at random (K = 2 draws without a loop)."""

    def __init__(self, seed: int = 0, device: torch.device | str = "cpu") -> None:
        """Args: seed: seed of the policy's own generator; device: where it draws."""
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def reseed(self, seed: int) -> None:
        """Restart the policy's randomness (`evaluate` does so for every batch)."""
        self.generator.manual_seed(seed)

    def select(self, env: RecSimEnv) -> torch.Tensor:
        rows, n_candidates = env.candidates.shape
        k = env.config.slate_size
        if k != 2:
            scores = torch.rand(env.candidates.shape, generator=self.generator, device=env.device)
            return torch.topk(scores, k, dim=1).indices
        first = torch.randint(n_candidates, (rows,), generator=self.generator, device=env.device)
        offset = torch.randint(
            1, n_candidates, (rows,), generator=self.generator, device=env.device
        )
        return torch.stack([first, (first + offset) % n_candidates], dim=1)


class MyopicSlatePolicy:
    """The K candidates the user is most interested in (the highest click probability now)."""

    def select(self, env: RecSimEnv) -> torch.Tensor:
        scores = env.users.interest.gather(1, env.candidates)
        return torch.topk(scores, env.config.slate_size, dim=1).indices


class QualityOraclePolicy:
    """The K candidates of highest hidden quality."""

    def select(self, env: RecSimEnv) -> torch.Tensor:
        return torch.topk(env.candidate_quality(), env.config.slate_size, dim=1).indices


class ScoringSlatePolicy:
    """A `rec.policy.SlatePolicy` (e.g. a trained TwoTowerPolicy) choosing RecSim slates.

    Users are given as interest (T), strength 0 and no sign-up topics; each cluster is an
    item with its one-hot topic and zero numerics. The policy scores the T clusters once per
    step and each row's K best-scoring candidates are shown, unless the policy chooses whole
    slates itself (`select_slates(users, candidate features, k)`, as SlateQ does).
    """

    def __init__(self, policy: torch.nn.Module, n_topics: int = N_TOPICS) -> None:
        """Args: policy: a SlatePolicy with `n_topics` topics; n_topics: T."""
        from rec.policy import item_feature_matrix

        self.policy = policy.eval()
        n_numeric = int(getattr(policy, "config", {}).get("n_numeric", 0))
        topics = torch.arange(n_topics)
        self.item_features = item_feature_matrix(topics, torch.zeros(n_topics, n_numeric), n_topics)

    def select(self, env: RecSimEnv) -> torch.Tensor:
        interest = env.users.interest
        zeros = interest.new_zeros(interest.shape[0], 1)
        user_features = torch.cat([interest, zeros, torch.zeros_like(interest)], dim=1)
        item_features = self.item_features.to(interest.device)
        if hasattr(self.policy, "select_slates"):
            docs = item_features[env.candidates]
            return self.policy.select_slates(user_features, docs, env.config.slate_size)
        scores = self.policy.score(user_features, item_features)
        candidate_scores = scores.gather(1, env.candidates)
        return torch.topk(candidate_scores, env.config.slate_size, dim=1).indices


def make_policy(name: str, seed: int = 0, device: torch.device | str = "cpu") -> RecSimPolicy:
    """`random`, `myopic`, `oracle`, or the path of a policy saved by `SlatePolicy.save`."""
    if name == "random":
        return RandomSlatePolicy(seed, device)
    if name == "myopic":
        return MyopicSlatePolicy()
    if name == "oracle":
        return QualityOraclePolicy()
    from rec.policy import load_slate_policy

    policy = load_slate_policy(name, map_location=device)
    if policy.config.get("n_topics") != N_TOPICS:
        raise ValueError(f"{name}: the recsim preset needs a policy over {N_TOPICS} topics")
    return ScoringSlatePolicy(policy)


BATCH_SEED_STRIDE = 1_000_003
"""Batch i of a run with seed s plays with seed s + i * stride (its policy with one more)."""

_worker_policy: RecSimPolicy | None = None


@torch.inference_mode()
def play_batch(
    policy: RecSimPolicy,
    n_episodes: int,
    seed: int,
    device: torch.device | str = "cpu",
    config: RecSimConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Play one batch of episodes to the end: (N,) return, clicks and steps of each."""
    env = RecSimEnv(config, seed=seed, device=device)
    if hasattr(policy, "reseed"):
        policy.reseed(seed + 1)
    env.reset(n_episodes)
    while not env.done:
        env.step(policy.select(env))
    return env.results()


def _play_in_worker(
    task: tuple[int, int, str, RecSimConfig | None],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.set_num_threads(1)
    n_episodes, seed, device, config = task
    return play_batch(_worker_policy, n_episodes, seed, device, config)


def evaluate(
    policy: RecSimPolicy,
    episodes: int,
    seed: int = 0,
    batch_size: int = 50_000,
    device: torch.device | str = "cpu",
    config: RecSimConfig | None = None,
    workers: int = 1,
) -> dict[str, float]:
    """Play `episodes` episodes in batches and summarise them.

    Every batch has a seed of its own, so the figures depend on the seed and the batch size
    but not on how many workers play the batches.

    Args:
        policy: chooses the slates.
        episodes: N, episodes to play.
        seed: seed of the environment.
        batch_size: episodes simulated together.
        device: where the tensors live.
        config: the environment's constants; RecSim's defaults when omitted.
        workers: processes playing batches side by side (forked, one torch thread each;
            CPU only). Processes use shared cores better than threads do: a thread that
            waits for a busy core stalls every multi-threaded tensor operation.

    Returns:
        `return` (mean episode return), `sem` (its standard error), `ctr` (clicks per step),
        `steps` (mean episode length), `user_steps`, `seconds` and `steps_per_s`.
    """
    sizes = [min(batch_size, episodes - first) for first in range(0, episodes, batch_size)]
    seeds = [seed + index * BATCH_SEED_STRIDE for index in range(len(sizes))]
    started = time.perf_counter()
    if workers > 1 and len(sizes) > 1 and torch.device(device).type == "cpu":
        global _worker_policy
        _worker_policy = policy
        tasks = [(n, s, str(device), config) for n, s in zip(sizes, seeds, strict=True)]
        # Limitation: fork only; a parent that already ran multi-threaded OpenMP regions
        # can leave the children's runtime unusable, so call this before other tensor work.
        context = multiprocessing.get_context("fork")
        with context.Pool(min(workers, len(sizes))) as pool:
            outcomes = pool.map(_play_in_worker, tasks, chunksize=1)
    else:
        outcomes = [
            play_batch(policy, n, s, device, config) for n, s in zip(sizes, seeds, strict=True)
        ]
    seconds = time.perf_counter() - started
    returns, clicks, steps = zip(*outcomes, strict=True)

    returns_all = torch.cat(returns).double()
    total_clicks = torch.cat(clicks).double().sum().item()
    total_steps = torch.cat(steps).double().sum().item()
    sem = returns_all.std().item() / math.sqrt(episodes) if episodes > 1 else float("nan")
    result = {
        "episodes": episodes,
        "return": returns_all.mean().item(),
        "sem": sem,
        "ctr": total_clicks / max(total_steps, 1.0),
        "steps": total_steps / episodes,
        "user_steps": total_steps,
        "seconds": seconds,
        "steps_per_s": total_steps / seconds,
    }
    logger.info(
        "recsim: %d episodes, return %.2f +- %.2f, ctr %.3f, %.0f user-steps/s",
        episodes,
        result["return"],
        sem,
        result["ctr"],
        result["steps_per_s"],
    )
    return result
