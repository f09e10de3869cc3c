"""Exact top-N with exploration over large catalogues, without a per-slot pass over all items.

The slate procedure is the one `rec.policy.top_n_with_exploration` documents: at each slot,
with probability 1 - exploration the best remaining service is taken, else one is drawn from
the softmax of the remaining scores. Its propensity is (1 - exploration) * 1[argmax]
+ exploration * softmax_remaining(chosen).

It runs in two steps. `summarise` makes one pass over a (B, S) score block while it sits in
cache: the n best services (candidates), their softmax weights, and the summed weights of the
other services per block. Block b holds the BLOCK columns b, b + W/BLOCK, b + 2W/BLOCK, ...
of the padded width W: strided blocks make block reductions vectorise across blocks, and W
is a multiple of 256 so that the W/BLOCK blocks come in whole 16-float vectors.
`rec.native` computes the same candidates with a fused C kernel and can run `select`'s
procedure too, from the same uniform numbers (`slot_uniforms`).
Greedy slots only ever take candidates (before slot t at most t are gone, so one of the n best
always remains), so `select` runs the n slots on those small tensors: an exploration draw
picks "a candidate" or "the tail" by their remaining mass, then a tail block by its mass, then
a service inside that block, whose weights a callback recomputes (16 dot products). Every
probability is a ratio of exact remaining masses (kept in float64), so the draws and
propensities are those of the slot-by-slot softmax procedure, up to float rounding.
Each (user, slot) consumes one uniform number u: the slot explores when u < exploration, and
u / exploration, uniform on [0, 1) given that, places the draw within the remaining mass; the
position inside the chosen tail block reuses what is left of it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

BLOCK = 16
"""Columns per tail block: the unit of the two-level exploration draw."""
WIDTH_MULTIPLE = 16 * BLOCK
"""The padded width's granularity: a whole number of 16-lane vectors of blocks."""

BlockWeights = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""(rows (k,), blocks (k,)) -> (softmax weights (k, BLOCK), scores (k, BLOCK)) of the
block's services; columns past the catalogue have weight 0."""


@dataclass
class Candidates:
    """What `select` needs from a block of users' scores."""

    index: torch.Tensor
    """(R, n) long: the n best services, best first."""
    score: torch.Tensor
    """(R, n) float32: their scores."""
    weight: torch.Tensor
    """(R, n) float64: their unnormalised softmax weights."""
    tail: torch.Tensor
    """(R, blocks) float64: summed weights of the other services, per block."""


def block_columns(blocks: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """(k, BLOCK) columns of the given blocks (k,)."""
    return blocks.unsqueeze(-1) + n_blocks * torch.arange(BLOCK)


def padded_width(n_items: int) -> int:
    """The catalogue width rounded up to a multiple of WIDTH_MULTIPLE."""
    return -(-n_items // WIDTH_MULTIPLE) * WIDTH_MULTIPLE


def top_keys(keys: torch.Tensor, n: int) -> torch.Tensor:
    """(B, n) column indices of the n largest keys per row, best first.

    Each of the n best lies in one of the n blocks with the largest maxima (a block ranked
    below n has n larger block maxima, hence n larger keys), so only those blocks are sorted.
    `keys` has a width that is a multiple of BLOCK, padding filled with -inf.
    """
    batch, width = keys.shape
    blocks = width // BLOCK
    if blocks < 2 * n:
        return torch.topk(keys, n, dim=1).indices
    block_max = keys.view(batch, BLOCK, blocks).amax(dim=1)
    best_blocks = torch.topk(block_max, n, dim=1, sorted=False).indices
    columns = block_columns(best_blocks, blocks).view(batch, n * BLOCK)
    local = torch.topk(keys.gather(1, columns), n, dim=1).indices
    return columns.gather(1, local)


def summarise(keys: torch.Tensor, n: int, n_items: int,
              to_weights: Callable[[torch.Tensor], None],
              to_scores: Callable[[torch.Tensor], torch.Tensor]) -> Candidates:
    """Candidates and tail masses of one cache-sized block of users.

    Args:
        keys: (B, padded_width(n_items)) keys monotone in the scores; overwritten.
        n: slots per user.
        n_items: real columns; the rest is padding.
        to_weights: turns keys into softmax weights in place.
        to_scores: maps candidate keys to scores.
    """
    keys[:, n_items:] = float("-inf")
    index = top_keys(keys, n)
    score = to_scores(keys.gather(1, index))
    to_weights(keys)
    keys[:, n_items:] = 0.0
    weight = keys.gather(1, index).double()
    keys.scatter_(1, index, 0.0)
    tail = keys.view(keys.shape[0], BLOCK, -1).sum(dim=1).double()
    return Candidates(index, score, weight, tail)


def _draw(cumulative: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """First column whose cumulative mass exceeds target (the last positive one at most)."""
    last = cumulative.shape[1] - 1
    target = torch.minimum(target, cumulative[:, -1] * (1.0 - 1e-12))
    return torch.searchsorted(cumulative, target.unsqueeze(1), right=True).squeeze(1).clamp(
        max=last)


def _tail_draws(cands: Candidates, tail: torch.Tensor, tail_taken: torch.Tensor,
                rows: torch.Tensor, target: torch.Tensor,
                block_weights: BlockWeights) -> tuple[torch.Tensor, ...]:
    """One draw from each row's remaining tail, target in [0, its tail mass).

    Picks a block by its remaining mass, then a service inside it by its recomputed weight,
    at the same fraction of the block's mass as the target lies within it; updates the
    block's mass in `tail`. Returns (items, their weights, their scores).
    """
    cumulative = tail[rows].cumsum(1)
    block = _draw(cumulative, target)
    mass = tail[rows, block]
    before = cumulative.gather(1, block.unsqueeze(1)).squeeze(1) - mass
    fraction = torch.where(mass > 0, ((target - before) / mass).clamp(0.0, 1.0), 0.0)
    weight, block_score = block_weights(rows, block)
    weight = weight.double()
    items = block_columns(block, tail.shape[1])
    gone = torch.cat([cands.index[rows], tail_taken[rows]], dim=1)
    weight[(items.unsqueeze(2) == gone.unsqueeze(1)).any(dim=2)] = 0.0
    inner = _draw(weight.cumsum(1), fraction * weight.sum(1)).unsqueeze(1)
    picked = weight.gather(1, inner).squeeze(1)
    weight.scatter_(1, inner, 0.0)
    tail[rows, block] = weight.sum(1)
    return items.gather(1, inner).squeeze(1), picked, block_score.gather(1, inner).squeeze(1)


_GOLDEN = 0x9E3779B97F4A7C15


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's output function on uint64 (wrapping arithmetic), as the kernel's mix64."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@dataclass(frozen=True)
class CounterUniforms:
    """Uniform numbers that are a function of (key, row, slot), not draws from a stream.

    The number of slot s of row r is splitmix64's mixer applied to the key's base plus the
    golden-ratio increment times the counter (first_row + r) * n + s + 1, its top 53 bits
    scaled to [0, 1). Any slice of rows gets the same numbers however the rows are split
    into blocks or threads, and `rec.native` computes them inside the kernel, so publishing
    never holds a (users, n) array of them.
    """

    key: int
    first_row: int = 0

    @property
    def base(self) -> int:
        return int(_mix64(np.array([self.key % 2**64], dtype=np.uint64))[0])

    def at(self, first_row: int) -> CounterUniforms:
        """The same numbers for rows counted from `first_row` on."""
        return CounterUniforms(self.key, first_row)

    def block(self, rows: int, n: int) -> torch.Tensor:
        """(rows, n) float64: the numbers of rows first_row .. first_row + rows - 1."""
        counter = (np.arange(rows * n, dtype=np.uint64)
                   + np.uint64(self.first_row) * np.uint64(n) + np.uint64(1))
        mixed = _mix64(np.uint64(self.base) + np.uint64(_GOLDEN) * counter)
        values = (mixed >> np.uint64(11)).astype(np.float64) * 2.0 ** -53
        return torch.from_numpy(values.reshape(rows, n))


def slot_uniforms(rows: int, n: int, exploration: float,
                  generator: torch.Generator | CounterUniforms) -> torch.Tensor | None:
    """The (rows, n) float64 uniform numbers `select` consumes; None without exploration."""
    if exploration <= 0.0:
        return None
    if isinstance(generator, CounterUniforms):
        return generator.block(rows, n)
    return torch.rand(rows, n, generator=generator, dtype=torch.float64)


def select(cands: Candidates, exploration: float, generator: torch.Generator | CounterUniforms,
           block_weights: BlockWeights) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the n slots of every row; returns indices (R, n), scores (R, n), propensities."""
    rows, n = cands.index.shape
    taken = torch.zeros(rows, n, dtype=torch.bool)
    tail_taken = torch.full((rows, n), -1, dtype=torch.long)
    tail = cands.tail.clone()
    cand_mass = cands.weight.sum(dim=1)
    tail_mass = tail.sum(dim=1)
    pointer = torch.zeros(rows, dtype=torch.long)
    uniform = slot_uniforms(rows, n, exploration, generator)
    explore = (uniform < exploration if uniform is not None
               else torch.zeros(rows, n, dtype=torch.bool))
    explorers_by_slot = explore.T.nonzero()
    explorers_by_slot = explorers_by_slot[:, 1].split(
        torch.bincount(explorers_by_slot[:, 0], minlength=n).tolist())
    index = torch.empty(rows, n, dtype=torch.long)
    score = torch.empty(rows, n)
    propensity = torch.empty(rows, n, dtype=torch.float64)

    for slot, explorers in enumerate(explorers_by_slot):
        total = cand_mass + tail_mass
        position = pointer.clone()
        tail_rows = explorers[:0]
        if len(explorers):
            target = uniform[explorers, slot] / exploration * total[explorers]
            in_cands = target < cand_mass[explorers]
            chosen_rows = explorers[in_cands]
            free = torch.where(taken[chosen_rows], 0.0, cands.weight[chosen_rows])
            position[chosen_rows] = _draw(free.cumsum(1), target[in_cands])
            tail_rows = explorers[~in_cands]
            if len(tail_rows):
                drawn = _tail_draws(cands, tail, tail_taken, tail_rows,
                                    target[~in_cands] - cand_mass[tail_rows], block_weights)
                tail_taken[tail_rows, slot] = drawn[0]
                tail_mass[tail_rows] = tail[tail_rows].sum(1)

        # Every row as if it took a candidate; rows that drew from the tail are fixed after.
        at = position.clamp(max=n - 1).unsqueeze(1)
        weight = cands.weight.gather(1, at).squeeze(1)
        greedy = (1.0 - exploration) * (position == pointer).double()
        index[:, slot] = cands.index.gather(1, at).squeeze(1)
        score[:, slot] = cands.score.gather(1, at).squeeze(1)
        propensity[:, slot] = greedy + exploration * weight / total
        if len(tail_rows):
            from_cands = torch.ones(rows, dtype=torch.bool)
            from_cands[tail_rows] = False
            taken.scatter_(1, at, taken.gather(1, at) | from_cands.unsqueeze(1))
            weight = torch.where(from_cands, weight, 0.0)
            index[tail_rows, slot], score[tail_rows, slot] = drawn[0], drawn[2]
            propensity[tail_rows, slot] = exploration * drawn[1] / total[tail_rows]
        else:
            taken.scatter_(1, at, True)
        cand_mass = (cand_mass - weight).clamp(min=0.0)
        # The greedy pointer skips candidates that exploration took out of order.
        while True:
            ahead = pointer.clamp(max=n - 1).unsqueeze(1)
            blocked = (pointer < n) & taken.gather(1, ahead).squeeze(1)
            if not blocked.any():
                break
            pointer += blocked.long()
    return index, score, propensity.clamp(max=1.0).float()
